//! The XDP attach point: parse, judge, act. Runs before the kernel allocates an skb.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_tail, bpf_xdp_load_bytes},
    macros::xdp,
    programs::XdpContext,
};
use core::mem::MaybeUninit;

use aya_log_ebpf::warn;

use crate::{
    parse::{Flow, Packet, parse},
    reset,
    verdict::{Action, Meta, count_rst, judge},
};

struct XdpPacket<'a>(&'a XdpContext);

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }

    #[inline(always)]
    fn len(&self) -> usize {
        // Not loaded with BPF_F_XDP_HAS_FRAGS: the frame is one linear buffer.
        self.0.data_end() - self.0.data()
    }

    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let mut buf = [0u8; N];
        // SAFETY: the helper writes at most N bytes into `buf` and checks `off` itself.
        let ret = unsafe {
            bpf_xdp_load_bytes(self.0.ctx, off as u32, buf.as_mut_ptr().cast(), N as u32)
        };
        (ret == 0).then_some(buf)
    }
}

#[xdp]
pub fn idgate_xdp(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    let meta = Meta {
        len: (end - start) as u32,
        ifindex: ctx.ingress_ifindex() as u32,
    };
    let mut slot = MaybeUninit::uninit();
    let flow = Flow::init(&mut slot);
    let parsed = parse(&XdpPacket(&ctx), flow);
    let verdict = judge(parsed, flow, &meta);
    match verdict.action {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Reset => {
            let Some(new_len) = reset::build(start, end, flow) else {
                return xdp_action::XDP_DROP;
            };
            let delta = new_len as i32 - meta.len as i32;
            // SAFETY: `ctx.ctx` is this program's context; shrinking needs no further checks.
            if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
                warn!(
                    &ctx,
                    "idgate: could not trim a RST to {} bytes; dropped", new_len
                );
                return xdp_action::XDP_DROP;
            }
            count_rst(verdict.service_id, new_len as u32);
            xdp_action::XDP_TX
        }
    }
}

/// Passes everything: the floor the verdict benchmark subtracts.
#[xdp]
pub fn idgate_xdp_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

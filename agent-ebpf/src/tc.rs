//! The TC attach point (a TCX ingress link on kernels ≥ 6.6): parse, judge, act.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    macros::classifier,
    programs::TcContext,
};
use core::mem::MaybeUninit;

use aya_log_ebpf::warn;

use crate::{
    parse::{Flow, L4, Packet, Parsed, parse},
    reset,
    verdict::{Action, Meta, count_rst, judge},
};

/// Bytes made linear when the headers straddle the skb's linear area: room for two VLAN tags,
/// IPv6 with a chain of extension headers, and a TCP header with options.
const PULL_LEN: u32 = 512;

struct TcPacket<'a>(&'a TcContext);

impl Packet for TcPacket<'_> {
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
        self.0.len() as usize
    }

    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let mut buf = [0u8; N];
        // SAFETY: the helper writes at most N bytes into `buf`, from linear or paged data, and
        // checks `off` itself.
        let ret = unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb.cast(),
                off as u32,
                buf.as_mut_ptr().cast(),
                N as u32,
            )
        };
        (ret == 0).then_some(buf)
    }
}

#[classifier]
pub fn idgate_tc(ctx: TcContext) -> i32 {
    let skb_len = ctx.len();
    let mut slot = MaybeUninit::uninit();
    let mut flow = Flow::init(&mut slot);
    let mut parsed = parse(&TcPacket(&ctx), flow);
    let incomplete = parsed == Parsed::BadL3 || (parsed == Parsed::Ip && flow.l4 == L4::Malformed);
    if incomplete && ((ctx.data_end() - ctx.data()) as u32) < skb_len {
        // Headers may be in paged data (GRO, some drivers): make them linear and look again.
        let want = if skb_len < PULL_LEN {
            skb_len
        } else {
            PULL_LEN
        };
        if ctx.pull_data(want).is_ok() {
            flow = Flow::init(&mut slot);
            parsed = parse(&TcPacket(&ctx), flow);
        }
    }
    // SAFETY: `ctx.skb.skb` is this program's context, valid for the whole run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let meta = Meta {
        len: skb_len,
        ifindex,
    };
    let verdict = judge(parsed, flow, &meta);
    match verdict.action {
        // TC_ACT_UNSPEC is TCX_NEXT: let later programs on the interface have their say.
        Action::Pass => TC_ACT_UNSPEC,
        Action::Drop => TC_ACT_SHOT,
        Action::Reset => {
            let Some(new_len) = reset::build(ctx.data(), ctx.data_end(), flow) else {
                return TC_ACT_SHOT;
            };
            // SAFETY: `ctx.skb.skb` is this program's context; shrinking the tail is always valid.
            if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len as u32, 0) } != 0 {
                warn!(
                    &ctx,
                    "idgate: could not trim a RST to {} bytes; dropped", new_len
                );
                return TC_ACT_SHOT;
            }
            count_rst(verdict.service_id, new_len as u32);
            // SAFETY: a plain helper call; redirecting to the ingress device sends on its egress.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
    }
}

const _: () = assert!(TC_ACT_REDIRECT == 7);

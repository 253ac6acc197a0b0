//! idgate's enforcement programs: one verdict routine ([`verdict`]), two thin attach points
//! ([`xdp`] and [`tc`]).
#![no_std]
#![no_main]

mod maps;
mod parse;
mod reset;
mod tc;
mod verdict;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that can reach this; it exists only to satisfy no_std.
    loop {}
}

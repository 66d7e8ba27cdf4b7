//! Raw Ethernet frames sent as a hostile caged host would: out of an interface of a lab
//! namespace as they are, whatever source MAC or address they claim.

use cage_agent::probe::NetNs;

/// Send `frames` out of `ifname` in `ns` as they are (AF_PACKET, SOCK_RAW); panics when a
/// frame cannot be sent.
pub fn send(ns: &NetNs, ifname: &str, frames: Vec<Vec<u8>>) {
    let ifname = ifname.to_owned();
    ns.run("sending raw frames", move || {
        // SAFETY: plain socket calls on a socket this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let name = std::ffi::CString::new(ifname.clone()).expect("no NUL in a name");
            let index = libc::if_nametoindex(name.as_ptr());
            assert!(index > 0, "no interface {ifname}");
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = index as i32;
            addr.sll_halen = 6;
            for f in &frames {
                addr.sll_addr[..6].copy_from_slice(&f[..6]);
                let n = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n,
                    f.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
        Ok(())
    })
    .expect("in the sender's namespace");
}

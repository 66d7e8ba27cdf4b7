//! Adding elements to the allow sets over nfnetlink, without the `nft` program: one batch
//! (begin; per address: add, or add, delete, add with the new timeout; end), each message
//! acked.

use std::io;
use std::net::IpAddr;

use netlink_sys::{constants::NETLINK_NETFILTER, Socket, SocketAddr};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One nfnetlink message: header, nfgenmsg, attributes.
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = 16 + 4 + attrs.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0]);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
}

/// The attributes of a set-element message for one address.
fn elements(addr: IpAddr, timeout_s: Option<u32>) -> Vec<u8> {
    let set = crate::policy::ALLOW_SETS[usize::from(addr.is_ipv6())];
    let value = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut key = Vec::new();
    attr(&mut key, NFTA_DATA_VALUE, &value);
    let mut elem = Vec::new();
    attr(&mut elem, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &key);
    if let Some(t) = timeout_s {
        attr(
            &mut elem,
            NFTA_SET_ELEM_TIMEOUT,
            &(u64::from(t) * 1000).to_be_bytes(),
        );
    }
    let mut list = Vec::new();
    attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
    let mut attrs = Vec::new();
    attr(
        &mut attrs,
        NFTA_SET_ELEM_LIST_TABLE,
        &cstr(crate::policy::TABLE),
    );
    attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, &cstr(set));
    attr(
        &mut attrs,
        NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
        &list,
    );
    attrs
}

pub fn add(entries: &[super::AllowElement]) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let base = std::process::id().wrapping_mul(7919) ^ (entries.len() as u32) << 20;
    let mut seq = base;
    let mut batch = Vec::new();
    message(
        &mut batch,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let mut acks = 0;
    let kind = |m: u16| (NFNL_SUBSYS_NFTABLES << 8) | m;
    for e in entries {
        let (addr, timeout) = (e.addr, e.timeout);
        let steps: &[(u16, Option<u32>, u16)] = if e.renew {
            &[
                (NFT_MSG_NEWSETELEM, Some(timeout), NLM_F_CREATE),
                (NFT_MSG_DELSETELEM, None, 0),
                (NFT_MSG_NEWSETELEM, Some(timeout), NLM_F_CREATE),
            ]
        } else {
            &[(NFT_MSG_NEWSETELEM, Some(timeout), NLM_F_CREATE)]
        };
        for &(m, t, flags) in steps {
            seq = seq.wrapping_add(1);
            message(
                &mut batch,
                kind(m),
                NLM_F_REQUEST | NLM_F_ACK | flags,
                seq,
                NFPROTO_INET,
                0,
                &elements(addr, t),
            );
            acks += 1;
        }
    }
    seq = seq.wrapping_add(1);
    message(
        &mut batch,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    socket.send(&batch, 0)?;
    // One ack (an error message with code 0) for each message that asked for one;
    // the first non-zero code is the kernel's refusal of the whole batch.
    let mut buf = vec![0u8; 65536];
    while acks > 0 {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < 16 || at + len > n {
                return Err(io::Error::other("malformed netlink answer"));
            }
            if kind == NLMSG_ERROR && len >= 20 {
                let code = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap_or_default());
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                acks -= 1;
            }
            at += (len + 3) & !3;
        }
    }
    Ok(())
}

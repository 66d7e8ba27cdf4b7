//! DNS without the network: `name` is the syntax and matching of names and of the
//! `allow_domain` / `doh_block` patterns; `message` reads queries and answers and builds
//! refusals, as the forwarder (`cage_agent::dns`) needs them.

pub mod message;
pub mod name;

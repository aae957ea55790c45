//! Several gateways as one cluster (docs/scale-out.md, issue 17), end to end: real gateways on
//! one real PostgreSQL database (and one S3-compatible bucket for the audit), real agents (in
//! network namespaces with no inbound route where it matters), stock OpenSSH clients. One
//! test binary, one module per part, to keep link times down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod agents;
mod audit;
mod peering;
mod sessions;

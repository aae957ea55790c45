//! What the RDP front door reads off the wire before it dials anything: the MS-RDPEPS
//! preconnection blob and the X.224 Connection Request ([`preamble`], a pure, bounded,
//! fuzzed parser), and the routing tokens the blob carries ([`token`]). No sockets here
//! beyond reading the preamble from a stream the door hands in.

pub mod preamble;
pub mod token;

#![no_main]
//! Coverage-guided fuzzing of the RDP front door's first reader: the preconnection blob
//! and the X.224 Connection Request, as an unauthenticated client sends them.

use libfuzzer_sys::fuzz_target;
use postern_gateway::rdp_wire::preamble::{MAX_PCB, MAX_X224, Step, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        // Asks only for more than it has, and never for more than the bounds.
        Ok(Step::Need(n)) => assert!(n > data.len() && n <= MAX_PCB + MAX_X224),
        Ok(Step::Done(p, used)) => {
            assert!(used <= data.len());
            assert!(!p.token.is_empty());
            assert!(p.connection_request.len() <= MAX_X224);
            // Parsing the bytes it used gives the same answer.
            assert_eq!(parse(&data[..used]), Ok(Step::Done(p, used)));
        }
        Err(_) => {}
    }
});

//! The front-end packages embedded at build time (gateway/build.rs): xterm.js and its fit
//! addon for the terminal, asciinema-player for replays. They come from npm, pinned by
//! `gateway/web/package-lock.json`; a build without npm has none ([`MISSING`] says why).

mod generated {
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

pub use generated::MISSING;

/// An embedded file by its name under `/assets/`, with its content type.
pub fn get(name: &str) -> Option<(&'static [u8], &'static str)> {
    let (body, content_type) = match name {
        "xterm.js" => (generated::XTERM_JS, "text/javascript; charset=utf-8"),
        "xterm.css" => (generated::XTERM_CSS, "text/css; charset=utf-8"),
        "addon-fit.js" => (generated::FIT_JS, "text/javascript; charset=utf-8"),
        "asciinema-player.js" => (generated::PLAYER_JS, "text/javascript; charset=utf-8"),
        "asciinema-player.css" => (generated::PLAYER_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    body.map(|b| (b, content_type))
}

//! The SSH front door.
//!
//! Three ways in, all on one port:
//! - `ssh -p 2222 alice%web-01@gateway`: the user name names the instance;
//! - `ssh deploy@web-01.<suffix>` with the config from `postern ssh-config`: OpenSSH jumps
//!   through the gateway as the person's Postern identity (`ProxyJump alice@...`) and opens
//!   a `direct-tcpip` channel to `web-01.<suffix>:22`; the gateway answers that channel
//!   itself with a second, inner SSH server whose host certificate covers `*.<suffix>`, so
//!   the client checks the host name it asked for, strictly, against the gateway's host CA.
//!   The inner hop authenticates the same person again; its user name is the OS login;
//! - `ssh -J alice@gateway alice@web-01`: a `direct-tcpip` channel to a plain instance name
//!   is raw TCP to that instance's own sshd (passthrough, end-to-end encrypted, unlogged).
//!
//! The russh handler only authenticates and accepts channels; each channel is served by its
//! own task that owns the channel, the agent stream and the recording.
//!
//! Inside the door, nothing imports this file: `listener` accepts connections, `handler`
//! (the russh handler) authenticates and answers channel opens, `session` serves shell,
//! exec and sftp channels in named phases (request, authorize, plan, record, open, relay,
//! end) with the shared `session_relay` moving their bytes, `forward` serves `-L`, passthrough and `@rdp`
//! channels, `commands` answers gateway commands, `login` serves `postern login`'s sign-in
//! connection, `settings` holds the russh settings,
//! `throttle` the backoff of failed authentications, `startups` the caps on connections
//! not yet authenticated, `channel` the messages said on a channel.

mod channel;
mod commands;
mod forward;
mod handler;
mod listener;
mod login;
mod session;
mod settings;
mod startups;
mod throttle;

pub use listener::serve;
pub use settings::ciphers;

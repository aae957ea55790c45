//! Message types. Each variant of [`Message`] has a fixed [`Kind`] byte; payload layouts are
//! documented in `docs/protocol.md` and locked by the golden tests.

use std::fmt;

use crate::ProtoError;
use crate::codec::{Reader, Writer};

/// Message kind byte in the frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Error = 0x01,
    Hello = 0x02,
    HelloAck = 0x03,
    RenewRequest = 0x04,
    RenewResponse = 0x05,
    EnrollRequest = 0x10,
    EnrollResponse = 0x11,
    Open = 0x20,
    Accept = 0x21,
    Reject = 0x22,
    Connected = 0x23,
    Stdin = 0x30,
    Stdout = 0x31,
    Stderr = 0x32,
    Resize = 0x33,
    Signal = 0x34,
    Eof = 0x35,
    Exit = 0x36,
}

impl Kind {
    pub const ALL: [Kind; 18] = [
        Kind::Error,
        Kind::Hello,
        Kind::HelloAck,
        Kind::RenewRequest,
        Kind::RenewResponse,
        Kind::EnrollRequest,
        Kind::EnrollResponse,
        Kind::Open,
        Kind::Accept,
        Kind::Reject,
        Kind::Connected,
        Kind::Stdin,
        Kind::Stdout,
        Kind::Stderr,
        Kind::Resize,
        Kind::Signal,
        Kind::Eof,
        Kind::Exit,
    ];

    pub fn from_byte(b: u8) -> Result<Self, ProtoError> {
        Self::ALL.into_iter().find(|k| *k as u8 == b).ok_or(ProtoError::UnknownKind(b))
    }
}

/// Why a request failed. Unknown codes from a newer peer decode as [`ErrorCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    TokenUnknown,
    TokenExpired,
    TokenUsed,
    Forbidden,
    Unavailable,
    Internal,
    AgentRevoked,
    Unsupported,
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 1,
            ErrorCode::TokenUnknown => 2,
            ErrorCode::TokenExpired => 3,
            ErrorCode::TokenUsed => 4,
            ErrorCode::Forbidden => 5,
            ErrorCode::Unavailable => 6,
            ErrorCode::Internal => 7,
            ErrorCode::AgentRevoked => 8,
            ErrorCode::Unsupported => 9,
            ErrorCode::Other(v) => v,
        }
    }
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::TokenUnknown,
            3 => ErrorCode::TokenExpired,
            4 => ErrorCode::TokenUsed,
            5 => ErrorCode::Forbidden,
            6 => ErrorCode::Unavailable,
            7 => ErrorCode::Internal,
            8 => ErrorCode::AgentRevoked,
            9 => ErrorCode::Unsupported,
            v => ErrorCode::Other(v),
        }
    }
}

/// 16 random bytes naming one session, shared by gateway, agent and audit log.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub message: String,
}

/// First frame on an agent's control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub agent_version: String,
    pub hostname: String,
    pub platform: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub agent_id: String,
    pub name: String,
}

/// Certificate renewal. The gateway takes the identity from the connection's certificate,
/// never from the CSR, and only uses the CSR's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewRequest {
    pub csr_der: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewResponse {
    pub cert_der: Vec<u8>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct EnrollRequest {
    pub token: String,
    pub csr_der: Vec<u8>,
    pub hostname: String,
    pub platform: String,
    pub agent_version: String,
}

// The token is a secret: it never appears in logs.
impl fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("token", &"<redacted>")
            .field("csr_der", &format_args!("{} bytes", self.csr_der.len()))
            .field("hostname", &self.hostname)
            .field("platform", &self.platform)
            .field("agent_version", &self.agent_version)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollResponse {
    pub agent_id: String,
    pub name: String,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecCommand {
    /// Run through the user's shell (`sh -c`), as SSH exec does.
    Shell(String),
    /// Run a program directly with these arguments; the first is the program.
    Argv(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: ExecCommand,
    pub env: Vec<(String, String)>,
    pub run_as: Option<String>,
    /// Whether a policy lets this user run as root. Without it the agent refuses any session
    /// that would run with uid 0, the agent's own user included (an agent installed as a
    /// service runs as root).
    pub allow_root: bool,
}

/// An interactive login shell on a PTY, or `command` on a PTY when set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellRequest {
    pub term: String,
    pub cols: u16,
    pub rows: u16,
    pub env: Vec<(String, String)>,
    pub run_as: Option<String>,
    pub command: Option<String>,
    /// As [`ExecRequest::allow_root`].
    pub allow_root: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRequest {
    pub host: String,
    pub port: u16,
}

/// A TCP connection to a host *name*: the agent resolves it, skips every address in one of
/// the `deny` ranges (CIDR text, from the policy's deny statements) or outside its own
/// `tcp_allow`, connects to the first address left, and answers [`Connected`] naming it.
/// (Addresses go as [`TcpRequest`]: the gateway has checked the exact address already.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpByNameRequest {
    pub host: String,
    pub port: u16,
    pub deny: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionRequest {
    Exec(ExecRequest),
    Shell(ShellRequest),
    Tcp(TcpRequest),
    /// Connect to the RDP server the agent's own configuration names (`[limits] rdp_address`,
    /// default 127.0.0.1:3389), then relay raw bytes like `Tcp`.
    Rdp,
    /// SSH passthrough: connect to the instance's own sshd where the agent's configuration
    /// says (`[limits] ssh_address`, default 127.0.0.1:22), then relay raw bytes like `Tcp`.
    /// The gateway cannot choose the port: passthrough never reaches another service.
    Ssh,
    TcpByName(TcpByNameRequest),
}

impl SessionRequest {
    /// A person is waiting on each byte (a PTY shell, an RDP screen): both ends send its
    /// stream ahead of bulk ones on the same tunnel connection.
    pub fn is_interactive(&self) -> bool {
        matches!(self, Self::Shell(_) | Self::Rdp)
    }
}

/// First frame on a session stream, sent by the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSession {
    pub session_id: SessionId,
    pub request: SessionRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    pub session_id: SessionId,
}

/// The accept of a [`TcpByNameRequest`]: the address (`ip:port`) the agent connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    pub session_id: SessionId,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub session_id: SessionId,
    pub code: ErrorCode,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resize {
    pub cols: u16,
    pub rows: u16,
}

/// A signal by its name without the `SIG` prefix, as SSH names them (`INT`, `TERM`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub name: String,
}

/// End of a process: `code` is the exit status, or 128+signal when `signal` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Error(ErrorMsg),
    Hello(Hello),
    HelloAck(HelloAck),
    RenewRequest(RenewRequest),
    RenewResponse(RenewResponse),
    EnrollRequest(EnrollRequest),
    EnrollResponse(EnrollResponse),
    Open(OpenSession),
    Accept(Accept),
    Reject(Reject),
    Connected(Connected),
    Stdin(Vec<u8>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Resize(Resize),
    Signal(Signal),
    Eof,
    Exit(Exit),
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Error(_) => Kind::Error,
            Message::Hello(_) => Kind::Hello,
            Message::HelloAck(_) => Kind::HelloAck,
            Message::RenewRequest(_) => Kind::RenewRequest,
            Message::RenewResponse(_) => Kind::RenewResponse,
            Message::EnrollRequest(_) => Kind::EnrollRequest,
            Message::EnrollResponse(_) => Kind::EnrollResponse,
            Message::Open(_) => Kind::Open,
            Message::Accept(_) => Kind::Accept,
            Message::Reject(_) => Kind::Reject,
            Message::Connected(_) => Kind::Connected,
            Message::Stdin(_) => Kind::Stdin,
            Message::Stdout(_) => Kind::Stdout,
            Message::Stderr(_) => Kind::Stderr,
            Message::Resize(_) => Kind::Resize,
            Message::Signal(_) => Kind::Signal,
            Message::Eof => Kind::Eof,
            Message::Exit(_) => Kind::Exit,
        }
    }

    pub(crate) fn encode_payload(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        match self {
            Message::Error(m) => {
                w.u16(m.code.to_u16());
                w.str(&m.message);
            }
            Message::Hello(m) => {
                w.str(&m.agent_version);
                w.str(&m.hostname);
                w.str(&m.platform);
            }
            Message::HelloAck(m) => {
                w.str(&m.agent_id);
                w.str(&m.name);
            }
            Message::RenewRequest(m) => w.bytes(&m.csr_der),
            Message::RenewResponse(m) => w.bytes(&m.cert_der),
            Message::EnrollRequest(m) => {
                w.str(&m.token);
                w.bytes(&m.csr_der);
                w.str(&m.hostname);
                w.str(&m.platform);
                w.str(&m.agent_version);
            }
            Message::EnrollResponse(m) => {
                w.str(&m.agent_id);
                w.str(&m.name);
                w.bytes(&m.cert_der);
                w.bytes(&m.ca_der);
            }
            Message::Open(m) => {
                w.0.extend_from_slice(&m.session_id.0);
                match &m.request {
                    SessionRequest::Exec(e) => {
                        w.u8(1);
                        match &e.command {
                            ExecCommand::Shell(c) => {
                                w.u8(1);
                                w.str(c);
                            }
                            ExecCommand::Argv(a) => {
                                w.u8(2);
                                w.strs(a);
                            }
                        }
                        w.pairs(&e.env);
                        w.opt_str(e.run_as.as_deref());
                        w.u8(u8::from(e.allow_root));
                    }
                    SessionRequest::Shell(s) => {
                        w.u8(2);
                        w.str(&s.term);
                        w.u16(s.cols);
                        w.u16(s.rows);
                        w.pairs(&s.env);
                        w.opt_str(s.run_as.as_deref());
                        w.opt_str(s.command.as_deref());
                        w.u8(u8::from(s.allow_root));
                    }
                    SessionRequest::Tcp(t) => {
                        w.u8(3);
                        w.str(&t.host);
                        w.u16(t.port);
                    }
                    SessionRequest::Rdp => w.u8(4),
                    SessionRequest::Ssh => w.u8(5),
                    SessionRequest::TcpByName(t) => {
                        w.u8(6);
                        w.str(&t.host);
                        w.u16(t.port);
                        w.strs(&t.deny);
                    }
                }
            }
            Message::Accept(m) => w.0.extend_from_slice(&m.session_id.0),
            Message::Reject(m) => {
                w.0.extend_from_slice(&m.session_id.0);
                w.u16(m.code.to_u16());
                w.str(&m.reason);
            }
            Message::Connected(m) => {
                w.0.extend_from_slice(&m.session_id.0);
                w.str(&m.address);
            }
            Message::Stdin(d) | Message::Stdout(d) | Message::Stderr(d) => {
                w.0.extend_from_slice(d);
            }
            Message::Resize(r) => {
                w.u16(r.cols);
                w.u16(r.rows);
            }
            Message::Signal(s) => w.str(&s.name),
            Message::Eof => {}
            Message::Exit(e) => {
                w.i32(e.code);
                w.opt_str(e.signal.as_deref());
            }
        }
    }

    pub(crate) fn decode_payload(kind: Kind, payload: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(payload);
        let msg = match kind {
            Kind::Error => Message::Error(ErrorMsg {
                code: ErrorCode::from_u16(r.u16("error.code")?),
                message: r.str("error.message")?,
            }),
            Kind::Hello => Message::Hello(Hello {
                agent_version: r.str("hello.agent_version")?,
                hostname: r.str("hello.hostname")?,
                platform: r.str("hello.platform")?,
            }),
            Kind::HelloAck => {
                Message::HelloAck(HelloAck { agent_id: r.str("hello_ack.agent_id")?, name: r.str("hello_ack.name")? })
            }
            Kind::RenewRequest => Message::RenewRequest(RenewRequest { csr_der: r.bytes("renew.csr")? }),
            Kind::RenewResponse => Message::RenewResponse(RenewResponse { cert_der: r.bytes("renew.cert")? }),
            Kind::EnrollRequest => Message::EnrollRequest(EnrollRequest {
                token: r.str("enroll.token")?,
                csr_der: r.bytes("enroll.csr")?,
                hostname: r.str("enroll.hostname")?,
                platform: r.str("enroll.platform")?,
                agent_version: r.str("enroll.agent_version")?,
            }),
            Kind::EnrollResponse => Message::EnrollResponse(EnrollResponse {
                agent_id: r.str("enrolled.agent_id")?,
                name: r.str("enrolled.name")?,
                cert_der: r.bytes("enrolled.cert")?,
                ca_der: r.bytes("enrolled.ca")?,
            }),
            Kind::Open => {
                let session_id = SessionId(r.fixed("open.session_id")?);
                let request = match r.u8("open.request")? {
                    1 => {
                        let command = match r.u8("exec.command")? {
                            1 => ExecCommand::Shell(r.str("exec.command")?),
                            2 => ExecCommand::Argv(r.strs("exec.argv")?),
                            v => {
                                return Err(ProtoError::InvalidValue { field: "exec.command", value: u32::from(v) });
                            }
                        };
                        SessionRequest::Exec(ExecRequest {
                            command,
                            env: r.pairs("exec.env")?,
                            run_as: r.opt_str("exec.run_as")?,
                            allow_root: r.flag("exec.allow_root")?,
                        })
                    }
                    2 => SessionRequest::Shell(ShellRequest {
                        term: r.str("shell.term")?,
                        cols: r.u16("shell.cols")?,
                        rows: r.u16("shell.rows")?,
                        env: r.pairs("shell.env")?,
                        run_as: r.opt_str("shell.run_as")?,
                        command: r.opt_str("shell.command")?,
                        allow_root: r.flag("shell.allow_root")?,
                    }),
                    3 => SessionRequest::Tcp(TcpRequest { host: r.str("tcp.host")?, port: r.u16("tcp.port")? }),
                    4 => SessionRequest::Rdp,
                    5 => SessionRequest::Ssh,
                    6 => SessionRequest::TcpByName(TcpByNameRequest {
                        host: r.str("tcp_by_name.host")?,
                        port: r.u16("tcp_by_name.port")?,
                        deny: r.strs("tcp_by_name.deny")?,
                    }),
                    v => return Err(ProtoError::InvalidValue { field: "open.request", value: u32::from(v) }),
                };
                Message::Open(OpenSession { session_id, request })
            }
            Kind::Accept => Message::Accept(Accept { session_id: SessionId(r.fixed("accept.session_id")?) }),
            Kind::Reject => Message::Reject(Reject {
                session_id: SessionId(r.fixed("reject.session_id")?),
                code: ErrorCode::from_u16(r.u16("reject.code")?),
                reason: r.str("reject.reason")?,
            }),
            Kind::Connected => Message::Connected(Connected {
                session_id: SessionId(r.fixed("connected.session_id")?),
                address: r.str("connected.address")?,
            }),
            // Data frames: the whole payload is the data.
            Kind::Stdin => return Ok(Message::Stdin(payload.to_vec())),
            Kind::Stdout => return Ok(Message::Stdout(payload.to_vec())),
            Kind::Stderr => return Ok(Message::Stderr(payload.to_vec())),
            Kind::Resize => Message::Resize(Resize { cols: r.u16("resize.cols")?, rows: r.u16("resize.rows")? }),
            Kind::Signal => Message::Signal(Signal { name: r.str("signal.name")? }),
            Kind::Eof => Message::Eof,
            Kind::Exit => Message::Exit(Exit { code: r.i32("exit.code")?, signal: r.opt_str("exit.signal")? }),
        };
        r.finish()?;
        Ok(msg)
    }
}

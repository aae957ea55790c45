//! The console's pages: plain HTML with one stylesheet, every value from users, agents or
//! the store escaped.

use postern_core::command::Instance;

use crate::web_signin::WebSession;

pub const STYLE: &str = r#":root { --ink: #1d2733; --muted: #5b6b7c; --line: #dde3ea; --accent: #2457c5; --bg: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); background: var(--bg); }
header { display: flex; align-items: center; justify-content: space-between; padding: 12px 28px; background: #fff; border-bottom: 1px solid var(--line); }
header .brand { font-weight: 700; font-size: 18px; letter-spacing: .02em; }
header .brand span { color: var(--accent); }
header .who { color: var(--muted); display: flex; gap: 14px; align-items: center; }
main { max-width: 1100px; margin: 28px auto; padding: 0 28px; }
h1 { font-size: 22px; margin: 0 0 16px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 22px 24px; }
.notice { border-left: 4px solid #c53b24; background: #fff5f3; padding: 12px 16px; border-radius: 6px; margin-bottom: 16px; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 10px 12px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); }
.label { display: inline-block; background: #eef2f8; border: 1px solid var(--line); border-radius: 999px; padding: 0 9px; margin: 0 4px 4px 0; font-size: 12px; }
.action { display: inline-block; background: #e9f0ff; color: var(--accent); border-radius: 4px; padding: 0 7px; margin: 0 4px 4px 0; font-size: 12px; }
.on { color: #197a3e; font-weight: 600; } .off { color: var(--muted); }
form.filter { display: flex; gap: 8px; margin-bottom: 16px; }
input[type=text] { flex: 1; padding: 8px 10px; border: 1px solid var(--line); border-radius: 6px; font: inherit; }
button { padding: 8px 14px; border: 1px solid var(--accent); background: var(--accent); color: #fff; border-radius: 6px; font: inherit; cursor: pointer; }
button.quiet { background: #fff; color: var(--accent); }
code { background: #eef2f8; padding: 1px 6px; border-radius: 4px; }
.empty { color: var(--muted); padding: 18px 0; }
header nav { display: flex; gap: 16px; margin-right: 12px; }
header nav a { color: var(--accent); text-decoration: none; font-weight: 600; }
body.terminal header nav a { color: #9fc0ff; }
form.search { display: grid; grid-template-columns: repeat(5, 1fr) auto; gap: 8px; margin-bottom: 16px; }
form.search input { padding: 8px 10px; border: 1px solid var(--line); border-radius: 6px; font: inherit; min-width: 0; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.tag { display: inline-block; border-radius: 4px; padding: 0 7px; font-size: 12px; background: #eef2f8; }
.tag.live { background: #e3f6ea; color: #197a3e; font-weight: 600; }
.tag.unlogged { background: #fff1e6; color: #9a4a10; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 0 0 18px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
#player { margin-top: 8px; }
a.more { display: inline-block; margin-top: 14px; }
a.open { display: inline-block; margin: 0 6px 4px 0; padding: 3px 10px; border-radius: 6px; background: var(--accent); color: #fff; text-decoration: none; font-size: 13px; white-space: nowrap; }
a.open:hover { background: #1b449e; }
form.open { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
form.open button { padding: 3px 10px; font-size: 13px; }
label.choice { font-size: 13px; color: var(--muted); }
label.choice select { font: inherit; padding: 2px 4px; border: 1px solid var(--line); border-radius: 4px; }
a.open.big { font-size: 15px; padding: 9px 18px; }
body.terminal { background: #0f1720; height: 100vh; display: flex; flex-direction: column; }
body.terminal header { background: #16202c; border-bottom: 1px solid #223044; color: #dbe4ee; }
body.terminal header .who { color: #9fb0c3; }
body.terminal header a { color: #9fc0ff; }
.termbar { display: flex; gap: 16px; align-items: center; padding: 8px 28px; background: #121b26; color: #9fb0c3; font-size: 13px; border-bottom: 1px solid #223044; }
.termbar strong { color: #e8eef5; }
.termbar .state { margin-left: auto; }
.termbar .state.live { color: #5fd38d; }
.termbar .state.ended { color: #ff9b85; }
#terminal { flex: 1; min-height: 0; padding: 6px 10px; }
#ended { display: none; margin: 0 28px 14px; border-left: 4px solid #ff9b85; background: #2a1b1b; color: #ffd9d0; padding: 10px 14px; border-radius: 6px; }
#ended.shown { display: block; }
"#;

/// The console's icon: a gate.
pub const ICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 32 32\"><rect width=\"32\" height=\"32\" rx=\"7\" fill=\"#2457c5\"/>\
<path d=\"M9 25V13a7 7 0 0 1 14 0v12\" fill=\"none\" stroke=\"#fff\" stroke-width=\"3\"/><path d=\"M16 6v19\" stroke=\"#fff\" stroke-width=\"2\"/></svg>";

/// The terminal and watch pages' own script: xterm.js on the console's WebSocket.
pub const TERMINAL_JS: &str = include_str!("terminal.js");
/// The replay page's own script: asciinema-player on the session's recording.
pub const REPLAY_JS: &str = include_str!("replay.js");

/// Asset URLs carry the build's version, so a browser's cached copy is never another build's.
fn asset(name: &str) -> String {
    format!("/assets/{name}?v={}", env!("CARGO_PKG_VERSION"))
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

pub use postern_core::util::url_decode;

/// A page's `<head>`: its title (escaped here), the console's stylesheet and icon, and
/// `extra` (more stylesheets, a refresh).
fn head(title: &str, extra: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Postern</title><link rel=\"stylesheet\" href=\"/app.css\"><link rel=\"icon\" href=\"/favicon.svg\">{extra}</head>",
        escape(title)
    )
}

fn page(title: &str, header_right: &str, body: &str) -> String {
    page_with(title, "", header_right, body)
}

fn page_with(title: &str, extra_head: &str, header_right: &str, body: &str) -> String {
    format!(
        "{}<body><header><div class=\"brand\">Post<span>ern</span></div><div class=\"who\">{header_right}</div></header>\
         <main>{body}</main></body></html>",
        head(title, extra_head)
    )
}

/// A problem to show above a page's content.
fn notice(problem: Option<&str>) -> String {
    problem.map(|p| format!("<div class=\"notice\" id=\"problem\">{}</div>", escape(p))).unwrap_or_default()
}

/// A query value or path segment, percent-encoded.
fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The signed-in user and the sign-out form, for a page's header.
fn who(s: &WebSession) -> String {
    format!(
        "<nav><a href=\"/\">Instances</a><a href=\"/sessions\">Sessions</a></nav><span id=\"user\">{}</span><form method=\"post\" action=\"/signout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button class=\"quiet\" type=\"submit\">Sign out</button></form>",
        escape(&s.user),
        escape(&s.csrf)
    )
}

/// A page around one terminal (terminal.js fills it): `bar` says what it is, `data` the
/// terminal element's attributes that tell the script what to open.
fn terminal_page(s: &WebSession, title: &str, bar: &str, data: &str) -> String {
    format!(
        "{}<body class=\"terminal\"><header><div class=\"brand\">Post<span>ern</span></div><div class=\"who\">{who}</div></header>\
         <div class=\"termbar\">{bar}<span class=\"state\" id=\"state\">connecting…</span></div>\
         <div id=\"ended\" role=\"alert\"></div>\
         <div id=\"terminal\" {data}></div>\
         <script src=\"{xterm}\"></script><script src=\"{fit}\"></script><script src=\"/terminal.js?v={v}\"></script></body></html>",
        head(title, &format!("<link rel=\"stylesheet\" href=\"{}\">", asset("xterm.css"))),
        who = who(s),
        xterm = asset("xterm.js"),
        fit = asset("addon-fit.js"),
        v = env!("CARGO_PKG_VERSION"),
    )
}

/// A terminal on `instance` (as `login`, with `profile`, when chosen): the script opens the
/// session.
pub fn terminal(s: &WebSession, instance: &str, login: Option<&str>, profile: Option<&str>) -> String {
    let mut chosen = login.map(|l| format!(" as <strong>{}</strong>", escape(l))).unwrap_or_default();
    if let Some(p) = profile {
        chosen.push_str(&format!(", profile <strong>{}</strong>", escape(p)));
    }
    let name = escape(instance);
    terminal_page(
        s,
        instance,
        &format!("<span>Shell on <strong id=\"instance\">{name}</strong>{chosen}</span><span id=\"session\"></span>"),
        &format!(
            "data-instance=\"{name}\" data-login=\"{}\" data-profile=\"{}\"",
            escape(login.unwrap_or("")),
            escape(profile.unwrap_or(""))
        ),
    )
}

/// A live session, watched read-only: who, where, and a terminal the script fills.
pub fn watch(s: &WebSession, session: &str, user: &str, instance: &str) -> String {
    let (user_, instance_, session_) = (escape(user), escape(instance), escape(session));
    terminal_page(
        s,
        &format!("Watching {user} on {instance}"),
        &format!(
            "<span>Watching <strong>{user_}</strong> on <strong id=\"instance\">{instance_}</strong></span>\
             <span id=\"session\">session {session_}</span>"
        ),
        &format!("data-session=\"{session_}\""),
    )
}

/// Open a terminal, choosing the login and the profile where the policy allows several
/// (a plain GET form: the page runs no script).
fn open_form(r: &Instance) -> String {
    let option = |value: &str, shown: &str| format!("<option value=\"{}\">{}</option>", escape(value), escape(shown));
    // The first login is the default one.
    let logins = if r.logins.len() > 1 {
        let opts: String = r
            .logins
            .iter()
            .enumerate()
            .map(|(i, l)| if i == 0 { option(l, &format!("{l} (default)")) } else { option(l, l) })
            .collect();
        format!("<label class=\"choice\">as <select name=\"login\">{opts}</select></label>")
    } else {
        String::new()
    };
    // No profile named: the policy's default profile, if it has one.
    let profiles = if r.profiles.is_empty() {
        String::new()
    } else {
        let opts: String =
            std::iter::once(option("", "default")).chain(r.profiles.iter().map(|p| option(p, p))).collect();
        format!("<label class=\"choice\">profile <select name=\"profile\">{opts}</select></label>")
    };
    format!(
        "<form class=\"open\" method=\"get\" action=\"/terminal\"><input type=\"hidden\" name=\"instance\" value=\"{}\">\
         {logins}{profiles}<button type=\"submit\">Open terminal</button></form>",
        escape(&r.name),
    )
}

/// `/terminal?instance=NAME`, its query escaped.
fn terminal_link(instance: &str) -> String {
    escape(&format!("/terminal?instance={}", url_encode(instance)))
}

/// Signed in, on the way to the console: a same-site navigation, so that the browser sends
/// the new SameSite=Strict cookie (a redirect at the end of the identity provider's chain
/// of redirects would count as cross-site).
pub fn signed_in_continue() -> String {
    page_with(
        "Signed in",
        "<meta http-equiv=\"refresh\" content=\"0;url=/\">",
        "",
        "<div class=\"card\"><h1>Signed in</h1><p><a href=\"/\">Continue to the console</a></p></div>",
    )
}

/// A page with one message.
pub fn message(title: &str, text: &str) -> String {
    page(title, "", &format!("<div class=\"card\"><h1>{}</h1><p>{}</p></div>", escape(title), escape(text)))
}

/// Not signed in: how to sign in, and why the last attempt failed.
pub fn signed_out(problem: Option<&str>, idp: bool) -> String {
    let notice = notice(problem);
    let idp = if idp {
        "<p><a class=\"open big\" id=\"idp\" href=\"/signin/oidc/start\">Sign in with your identity provider</a></p>\
         <p class=\"off\">Or, with the SSH key you already use:</p>"
    } else {
        "<p>Ask the gateway for a one-time sign-in link with the SSH key you already use:</p>"
    };
    page(
        "Sign in",
        "",
        &format!(
            "{notice}<div class=\"card\"><h1>Sign in to Postern</h1>{idp}\
             <p><code>postern web-login --gateway GATEWAY</code></p>\
             <p>Open the link it prints within two minutes; it works once.</p></div>"
        ),
    )
}

/// The instances the user may reach, filtered by a label selector.
pub fn instances(s: &WebSession, rows: &[Instance], labels: Option<&str>, problem: Option<&str>) -> String {
    let who = who(s);
    let notice = notice(problem);
    let mut table = String::new();
    if rows.is_empty() {
        table.push_str("<p class=\"empty\" id=\"none\">No instance you may reach");
        if labels.is_some() {
            table.push_str(" matches this filter");
        }
        table.push_str(".</p>");
    } else {
        table.push_str("<table id=\"instances\"><thead><tr><th>Instance</th><th>Labels</th><th>Status</th><th>You may</th><th>Logins</th><th></th></tr></thead><tbody>");
        for r in rows {
            let labels: String = r
                .labels
                .iter()
                .map(|(k, v)| format!("<span class=\"label\">{}={}</span>", escape(k), escape(v)))
                .collect();
            let actions: String =
                r.actions.iter().map(|a| format!("<span class=\"action\">{}</span>", escape(a))).collect();
            let status =
                if r.online { "<span class=\"on\">online</span>" } else { "<span class=\"off\">offline</span>" };
            let logins = if r.logins.is_empty() { "&mdash;".to_owned() } else { escape(&r.logins.join(", ")) };
            let open = if !r.online || !r.actions.iter().any(|a| a == "shell") {
                String::new()
            } else if r.logins.len() > 1 || !r.profiles.is_empty() {
                open_form(r)
            } else {
                format!("<a class=\"open\" href=\"{}\">Open terminal</a>", terminal_link(&r.name))
            };
            table.push_str(&format!(
                "<tr><td><strong>{}</strong><br><span class=\"off\">{}</span></td><td>{labels}</td><td>{status}</td><td>{actions}</td><td>{logins}</td><td>{open}</td></tr>",
                escape(&r.name),
                escape(&r.hostname)
            ));
        }
        table.push_str("</tbody></table>");
    }
    page(
        "Instances",
        &who,
        &format!(
            "{notice}<h1>Instances</h1><div class=\"card\"><form class=\"filter\" method=\"get\" action=\"/\">\
             <input type=\"text\" name=\"labels\" placeholder=\"Filter by labels: env=prod,role!=db\" value=\"{}\">\
             <button type=\"submit\">Filter</button></form>{table}</div>",
            escape(labels.unwrap_or(""))
        ),
    )
}

/// What the history's search form holds.
#[derive(Default)]
pub struct HistoryForm {
    pub user: Option<String>,
    pub instance: Option<String>,
    pub kind: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
}

fn utc(t: i64) -> String {
    jiff::Timestamp::from_second(t).map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()
}

fn duration(secs: i64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// `/sessions/ID`, its id escaped for a link.
fn session_link(id: &str) -> String {
    format!("/sessions/{}", url_encode(id))
}

/// The session history: a search form and one page of sessions.
pub fn sessions(
    s: &WebSession,
    rows: &[crate::history::HistoryRow],
    form: &HistoryForm,
    admin: bool,
    more: bool,
    problem: Option<&str>,
) -> String {
    let notice = notice(problem);
    let value = |v: &Option<String>| escape(v.as_deref().unwrap_or(""));
    let user_field = if admin {
        format!("<input type=\"text\" name=\"user\" placeholder=\"User\" value=\"{}\">", value(&form.user))
    } else {
        format!("<input type=\"text\" value=\"{}\" disabled title=\"You see your own sessions\">", escape(&s.user))
    };
    let mut table = String::new();
    if rows.is_empty() {
        table.push_str("<p class=\"empty\" id=\"none\">No sessions match.</p>");
    } else {
        table.push_str(
            "<table id=\"sessions\"><thead><tr><th>Started (UTC)</th><th>User</th><th>Instance</th><th>Kind</th>\
                        <th>Duration</th><th>Ended</th><th>Recording</th></tr></thead><tbody>",
        );
        for r in rows {
            let ended = if r.active {
                "<span class=\"tag live\">live</span>".to_owned()
            } else {
                let reason = r.end_reason.as_deref().map(escape).unwrap_or_default();
                match r.exit_code {
                    Some(c) if reason.is_empty() => format!("exit {c}"),
                    Some(c) => format!("{reason}, exit {c}"),
                    None => reason,
                }
            };
            let watch = if admin && r.active && (r.kind == "shell" || r.kind == "exec") && r.door != "admin-socket" {
                format!("<a class=\"open\" href=\"/watch?session={}\">Watch</a>", url_encode(&r.id))
            } else {
                String::new()
            };
            let recording = if r.logged && r.recording.is_some() && (r.recording_local || r.recording_s3.is_some()) {
                format!("<a class=\"open\" href=\"{}\">Replay</a>", escape(&session_link(&r.id)))
            } else if r.logged && r.recording.is_some() {
                "<span class=\"off\">removed</span>".to_owned()
            } else {
                format!(
                    "<span class=\"tag unlogged\" title=\"{}\">not recorded</span>",
                    escape(r.reason.as_deref().unwrap_or(""))
                )
            };
            table.push_str(&format!(
                "<tr data-session=\"{id}\"><td class=\"num\">{started}</td><td>{user}</td><td><strong>{target}</strong></td>\
                 <td>{kind}<br><span class=\"off\">via {door}</span></td><td class=\"num\">{dur}</td><td>{ended}</td><td>{watch}{recording}</td></tr>",
                id = escape(&r.id),
                started = utc(r.started_at),
                user = escape(&r.user),
                target = escape(&r.target),
                kind = escape(&r.kind),
                door = escape(&r.door),
                dur = duration(r.duration_secs),
            ));
        }
        table.push_str("</tbody></table>");
        if let (true, Some(last)) = (more, rows.last()) {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in [
                ("user", &form.user),
                ("instance", &form.instance),
                ("kind", &form.kind),
                ("since", &form.since),
                ("until", &form.until),
            ] {
                if let Some(v) = v {
                    q.append_pair(k, v);
                }
            }
            q.append_pair("before", &last.id);
            table.push_str(&format!(
                "<a class=\"more\" href=\"/sessions?{}\">Older sessions &rarr;</a>",
                escape(&q.finish())
            ));
        }
    }
    page(
        "Sessions",
        &who(s),
        &format!(
            "{notice}<h1>Sessions</h1><div class=\"card\"><form class=\"search\" method=\"get\" action=\"/sessions\">\
             {user_field}<input type=\"text\" name=\"instance\" placeholder=\"Instance\" value=\"{instance}\">\
             <input type=\"text\" name=\"kind\" placeholder=\"Kind or door (shell, web, ...)\" value=\"{kind}\">\
             <input type=\"text\" name=\"since\" placeholder=\"Since (2h, 7d, 2026-12-01)\" value=\"{since}\">\
             <input type=\"text\" name=\"until\" placeholder=\"Until\" value=\"{until}\">\
             <button type=\"submit\">Search</button></form>{table}</div>",
            instance = value(&form.instance),
            kind = value(&form.kind),
            since = value(&form.since),
            until = value(&form.until),
        ),
    )
}

/// One session: who, where, when, and its recording in a player (or why there is none).
pub fn replay(s: &WebSession, r: &crate::history::HistoryRow, unrecorded: Option<&str>, no_player: bool) -> String {
    let ended = match (r.active, r.ended_at) {
        (true, _) => "still running".to_owned(),
        (false, Some(t)) => format!("{} UTC", utc(t)),
        (false, None) => "&mdash;".to_owned(),
    };
    let exit = match (&r.end_reason, r.exit_code) {
        (Some(why), Some(c)) => format!("{}, exit status {c}", escape(why)),
        (Some(why), None) => escape(why),
        (None, Some(c)) => format!("exit status {c}"),
        (None, None) => "&mdash;".to_owned(),
    };
    let facts = format!(
        "<dl class=\"facts\"><dt>User</dt><dd>{user}{from}</dd><dt>Instance</dt><dd><strong>{target}</strong></dd>\
         <dt>Kind</dt><dd>{kind} via {door}{command}</dd><dt>Started</dt><dd>{started} UTC</dd><dt>Ended</dt><dd>{ended}</dd>\
         <dt>Duration</dt><dd>{dur}</dd><dt>Outcome</dt><dd>{exit}</dd></dl>",
        user = escape(&r.user),
        from =
            r.source.as_deref().map(|f| format!(" <span class=\"off\">from {}</span>", escape(f))).unwrap_or_default(),
        target = escape(&r.target),
        kind = escape(&r.kind),
        door = escape(&r.door),
        command = r.command.as_deref().map(|c| format!(": <code>{}</code>", escape(c))).unwrap_or_default(),
        started = utc(r.started_at),
        dur = duration(r.duration_secs),
    );
    let player = match (unrecorded, no_player) {
        (Some(why), _) => format!("<p class=\"empty\" id=\"none\">This session has no recording: {}.</p>", escape(why)),
        (None, true) => "<p class=\"empty\" id=\"none\">This gateway was built without the replay player; use \
                         <code>postern replay</code>.</p>"
            .to_owned(),
        (None, false) if !r.recording_local && r.recording_s3.is_none() => {
            "<p class=\"empty\" id=\"none\">The recording is no longer on this gateway.</p>".to_owned()
        }
        (None, false) => format!(
            "<div id=\"player\" data-cast=\"{cast}\"></div>\
             <script src=\"{js}\"></script><script src=\"/replay.js?v={v}\"></script>",
            cast = escape(&format!("{}/cast", session_link(&r.id))),
            js = asset("asciinema-player.js"),
            v = env!("CARGO_PKG_VERSION"),
        ),
    };
    let css = if no_player {
        String::new()
    } else {
        format!("<link rel=\"stylesheet\" href=\"{}\">", asset("asciinema-player.css"))
    };
    page_with(
        &format!("Session {}", r.id.get(..12).unwrap_or(&r.id)),
        &css,
        &who(s),
        &format!("<h1>Session <code>{}</code></h1><div class=\"card\">{facts}{player}</div>", escape(&r.id)),
    )
}

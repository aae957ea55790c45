//! The session history in the console: the sessions a user may see (their own; everyone's
//! for members of `[web] admin_groups`), searchable by user, instance, kind and time, and
//! recordings played in the page (asciinema-player) from the data directory or the object
//! store.

use std::io::Read as _;

use hyper::StatusCode;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};

use super::common::{Answer, CSP_PLAYER, answer, html, is_admin, query_param, with_csp};
use super::pages::{self, HistoryForm};
use crate::history::{HistoryRow, SessionFilter, valid_prefix};
use crate::services::Services;
use crate::store::SessionRecord;
use crate::web_signin::WebSession;

/// Rows on one page of the history.
const PAGE: u32 = 50;
/// Largest recording sent to a browser (a longer one is for `postern replay`).
const MAX_CAST: u64 = 64 << 20;

/// `GET /sessions`: the history page.
pub(super) async fn list(state: &Services, s: &WebSession, req: &hyper::Request<Incoming>) -> Answer {
    let admin = is_admin(state, &s.user);
    let field = |name: &str| query_param(req, name);
    let form = HistoryForm {
        user: if admin { field("user") } else { None },
        instance: field("instance"),
        kind: field("kind"),
        since: field("since"),
        until: field("until"),
    };
    let mut problems = Vec::new();
    let mut when = |name: &str, v: &Option<String>| {
        v.as_deref().and_then(|t| crate::manage::parse_when(t).map_err(|e| problems.push(format!("{name}: {e}"))).ok())
    };
    let (since, until) = (when("Since", &form.since), when("Until", &form.until));
    let filter = SessionFilter {
        // Everyone else sees only their own.
        user: if admin { form.user.clone() } else { Some(s.user.clone()) },
        instance: form.instance.clone(),
        kind: form.kind.clone(),
        since,
        until,
        before: field("before").filter(|b| valid_prefix(b)),
        limit: Some(PAGE),
    };
    let rows = if problems.is_empty() {
        match crate::manage::history(&state.manage, &filter).await {
            Ok(rows) => rows,
            Err(e) => {
                problems.push(e.to_string());
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    let more = rows.len() == PAGE as usize;
    let problem = (!problems.is_empty()).then(|| problems.join("; "));
    html(StatusCode::OK, pages::sessions(s, &rows, &form, admin, more, problem.as_deref()))
}

/// The session `id` names, if this user may see it.
async fn visible(state: &Services, s: &WebSession, id: &str) -> Option<SessionRecord> {
    if !valid_prefix(id) {
        return None;
    }
    let found = state.store.sessions_by_prefix(id, 2).await.ok()?;
    let r = found.into_iter().find(|r| r.id == id)?;
    (r.user == s.user || is_admin(state, &s.user)).then_some(r)
}

fn not_found() -> Answer {
    html(StatusCode::NOT_FOUND, pages::message("No such session", "There is no session with this id that you may see."))
}

/// `GET /sessions/ID`: who, where, when, and the recording in a player.
pub(super) async fn replay_page(state: &Services, s: &WebSession, id: &str) -> Answer {
    let Some(record) = visible(state, s, id).await else { return not_found() };
    let unrecorded = crate::history::unrecorded(&record);
    let mut row = HistoryRow::of(record, None, postern_core::util::now_unix());
    row.locate_recording(state.shipper.as_deref());
    let page = pages::replay(s, &row, unrecorded.as_deref(), super::assets::MISSING.is_some());
    with_csp(html(StatusCode::OK, page), CSP_PLAYER)
}

/// `GET /sessions/ID/cast`: the recording as asciicast, unsealed, from the data directory
/// or (when retention removed it there) the object store.
pub(super) async fn cast(state: &Services, s: &WebSession, id: &str) -> Answer {
    let text = |status, body: String| answer(status, "text/plain; charset=utf-8", body);
    let Some(record) = visible(state, s, id).await else {
        return text(StatusCode::NOT_FOUND, "no such session".into());
    };
    if let Some(why) = crate::history::unrecorded(&record) {
        return text(StatusCode::NOT_FOUND, format!("no recording: {why}"));
    }
    match load(state, &record).await {
        Ok(body) => {
            let mut r = answer(StatusCode::OK, "application/x-asciicast", body);
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
            r
        }
        Err(why) => {
            postern_tunnel::warn_limited!(session_id = %record.id, error = %why, "web console: cannot load a recording");
            text(StatusCode::NOT_FOUND, why)
        }
    }
}

/// The recording's text, unsealed with the gateway's keyring.
async fn load(state: &Services, record: &SessionRecord) -> Result<Vec<u8>, String> {
    let dir = state.config.data_dir.join("recordings");
    let mut fetched = None;
    let path = match crate::recording::find(&dir, &record.id) {
        Some(p) => p,
        None => {
            let Some(s3) = &state.config.audit.s3 else {
                return Err(format!("the recording of session {} is no longer on this gateway", record.id));
            };
            // A cluster's history says which gateway made it: it is in that gateway's folder.
            let made_at = record.gateway.as_deref().or(state.config.gateway_id());
            let shipper = crate::audit::ship::Shipper::new(s3, &state.config.data_dir)
                .map_err(|e| e.to_string())?
                .for_gateway(made_at);
            let downloaded = crate::recording::download(&shipper, &record.id, &state.config.data_dir, "web-replay")
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!(
                        "no recording of session {} here or in {}",
                        record.id,
                        shipper.location(crate::audit::ship::Kind::Recording)
                    )
                })?;
            fetched.insert(downloaded).path().to_path_buf()
        }
    };
    let keyring = state.config.audit.encryption.keyring().map_err(|e| e.to_string())?;
    let plain = crate::audit::seal::Plain::open(&path, &keyring).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut body = Vec::new();
    plain.take(MAX_CAST + 1).read_to_end(&mut body).map_err(|e| format!("{}: {e}", path.display()))?;
    if body.len() as u64 > MAX_CAST {
        return Err(format!(
            "the recording is larger than {} MiB: replay it with postern replay {}",
            MAX_CAST >> 20,
            record.id
        ));
    }
    drop(fetched);
    Ok(body)
}

//! How the command line prints: plain tables and relative times.

/// A Unix time as "now", "5m ago", "3d ago" ("never" for none).
pub fn ago(unix: Option<i64>) -> String {
    let Some(t) = unix else { return "never".into() };
    let secs = postern_core::util::now_unix().saturating_sub(t).max(0);
    match secs {
        0..=5 => "now".into(),
        6..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// A Unix time as an RFC 3339 UTC timestamp, to the second.
pub fn timestamp(unix: i64) -> String {
    jiff::Timestamp::from_second(unix).map(|t| t.to_string()).unwrap_or_else(|_| unix.to_string())
}

/// A length of time in its largest whole unit and the next ("7h59m", "4m30s", "12s").
pub fn duration_secs(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// `s` with control characters escaped (ESC becomes `\u{1b}`): table cells carry text
/// from agents and users, which must not reach the terminal as escape sequences.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars().map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() }).collect()
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A plain text table with columns padded to their widest cell; control characters in
/// cells are escaped.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| printable(c).into_owned()).collect()).collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
        s.truncate(s.trim_end().len());
        s
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_escape_control_characters() {
        let out = table(&["A", "B"], &[vec!["x\x1b[2J".into(), "\x07\r\n".into()]]);
        assert!(!out.contains('\x1b') && !out.contains('\x07') && !out.contains('\r'), "{out:?}");
        assert!(out.contains("x\\u{1b}[2J"), "{out:?}");
        assert_eq!(out.matches('\n').count(), 2, "{out:?}");
    }
}

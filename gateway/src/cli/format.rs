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

//! `[audit] max_recording_bytes`: the recording stops under its limit with a marker.

use super::*;

#[tokio::test]
async fn a_recording_stops_under_its_limit_with_a_marker_and_its_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RecordingOptions { max_bytes: 64 << 10, ..RecordingOptions::default() };
    let mut r = Recorder::create(dir.path(), "cap", (80, 24), "t", None, &opts).unwrap();
    let nuls = vec![0u8; 4096];
    for _ in 0..100 {
        r.output(&nuls).await.unwrap();
    }
    assert!(r.limit_reached().unwrap().contains("max_recording_bytes"));
    assert!(r.failure().is_none(), "a limit is not a failure");
    r.finish(Some(0)).await.unwrap();
    let text = std::fs::read_to_string(r.path()).unwrap();
    assert!(text.len() as u64 <= 64 << 10, "{} bytes", text.len());
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let n = lines.len();
    assert!(n > 3);
    assert_eq!(lines[n - 2][1], "m");
    assert!(lines[n - 2][2].as_str().unwrap().contains("max_recording_bytes"));
    assert_eq!(lines[n - 1][2], "exit 0");
}

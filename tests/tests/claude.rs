use std::process::Stdio;
use std::time::{Duration, Instant};
use grizzly_devkit::{FakeApiConfig, FakeMessagesApi, FailureMode};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn explore() {
    let fake = FakeMessagesApi::start(FakeApiConfig::default()).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let extra: Vec<String> = std::env::var("EXTRA").unwrap_or_default().split('|').filter(|s| !s.is_empty()).map(String::from).collect();
    let mut child = Command::new("/work/main/.tools/bin/claude")
        .args(["-p","--input-format","stream-json","--output-format","stream-json","--verbose","--bare","--system-prompt","test agent","--tools","","--strict-mcp-config","--no-session-persistence","--permission-mode","bypassPermissions"])
        .args(&extra)
        .envs(fake.claude_env()).env("HOME", home.path()).env("IS_SANDBOX","1").env("API_TIMEOUT_MS","3000")
        .current_dir(home.path())
        .stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let t0 = Instant::now();
    let script = std::env::var("SCRIPT").unwrap_or("/clear;hello;/clear;again".into());
    for msg in script.split(';') {
        if msg == "HANG" { fake.set_failure(FailureMode::Hang); continue; }
        if msg == "OK" { fake.set_failure(FailureMode::None); continue; }
        let line = if msg == "INT" {
            serde_json::json!({"type":"control_request","request_id":"r1","request":{"subtype":"interrupt"}})
        } else { serde_json::json!({"type":"user","message":{"role":"user","content":msg}}) };
        let t = Instant::now();
        stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        if msg.starts_with("slow") { tokio::time::sleep(Duration::from_millis(500)).await; continue; }
        loop {
            let l = match tokio::time::timeout(Duration::from_secs(20), out.next_line()).await { Ok(l) => l.unwrap(), Err(_) => { eprintln!("TIMEOUT"); break } };
            let Some(l) = l else { eprintln!("EOF"); return };
            eprintln!("[{:?}] {}", t.elapsed(), &l[..l.len().min(400)]);
            if l.contains("\"type\":\"result\"") { break; }
        }
    }
    eprintln!("total {:?}", t0.elapsed());
}

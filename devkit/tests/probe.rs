mod common;
use common::*;
use grizzly_devkit::*;
use std::time::{Duration, Instant};

#[tokio::test]
async fn probe() -> anyhow::Result<()> {
    let fake = FakeMessagesApi::start(FakeApiConfig::default()).await?;
    let mut c = Claude::spawn_with_env(&fake, &["--tools", ""], &[("API_TIMEOUT_MS", "3000")])?;
    let show = |t: &str, r: &serde_json::Value, el: Duration| eprintln!("== {t} ({el:?}) is_error={} subtype={} result={} api_error_status={} stop={}", r["is_error"], r["subtype"], r["result"], r["api_error_status"], r["stop_reason"]);
    for (mode, t) in [(FailureMode::None, "warm"), (FailureMode::FailNext(1), "failnext"), (FailureMode::None, "after failnext"), (FailureMode::ErrorStatus(529), "e529"), (FailureMode::ErrorStatus(400), "e400"), (FailureMode::Hang, "hang"), (FailureMode::StallMidStream, "stall"), (FailureMode::None, "recovered")] {
        fake.set_failure(mode);
        let t0 = Instant::now();
        c.send(t).await?;
        let (r, seen) = c.read_result(Duration::from_secs(60)).await?;
        show(t, &r, t0.elapsed());
        for s in seen { if s["type"] != "system" { eprintln!("   seen {}", s.to_string().chars().take(400).collect::<String>()); } }
    }
    eprintln!("stats: {:?}", fake.stats());
    c.close().await?;
    Ok(())
}

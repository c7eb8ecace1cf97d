//! The broker's authentication as deployed (`k8s/base/nats/auth.conf`, included by a real
//! nats-server): Grizzly runs end to end as user `grizzly`; anonymous clients are refused; the
//! `publisher` user can append domain events and nothing else.

use std::path::Path;
use std::time::Duration;

use grizzly_shared::nats::{EVENTS_STREAM, TASKS_STREAM};
use grizzly_tests::TestEnv;

const DEADLINE: Duration = Duration::from_secs(60);
const GRIZZLY_PASSWORD: &str = "g-secret-1";
const PUBLISHER_PASSWORD: &str = "p-secret-2";

async fn secured_env() -> anyhow::Result<TestEnv> {
    let auth = Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/base/nats/auth.conf");
    TestEnv::start_with(
        |o| {
            o.include = Some(auth);
            o.env = vec![
                ("NATS_GRIZZLY_PASSWORD".into(), GRIZZLY_PASSWORD.into()),
                ("NATS_PUBLISHER_PASSWORD".into(), PUBLISHER_PASSWORD.into()),
            ];
        },
        |server| {
            format!(
                "nats://grizzly:{GRIZZLY_PASSWORD}@127.0.0.1:{}",
                server.port()
            )
        },
    )
    .await
}

/// Messages stored on `subject` in `stream` (read as `grizzly`).
async fn stored(env: &TestEnv, stream: &str, subject: &str) -> anyhow::Result<u64> {
    use futures::StreamExt as _;
    let mut counts = env
        .nats
        .js
        .get_stream(stream)
        .await?
        .info_with_subjects(subject)
        .await?;
    let mut total = 0;
    while let Some(entry) = counts.next().await {
        total += entry?.1 as u64;
    }
    Ok(total)
}

#[tokio::test]
async fn only_authenticated_clients_get_in_and_publishers_only_append_domain_events()
-> anyhow::Result<()> {
    let env = secured_env().await?;
    let script = env.write_script(
        "echo.py",
        "import json, sys\nfor line in sys.stdin:\n    print(json.dumps({\"done\": True, \"output\": \"ok\"}), flush=True)\n",
    );
    env.write_handler(
        "echo",
        &format!(
            "name: echo\non: [\"events.agent.*.ping\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\n",
            script.display()
        ),
    );
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    let port = env
        .settings
        .nats_url
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();

    // Anonymous and wrong-password clients are refused at connect.
    let address = format!("nats://127.0.0.1:{port}");
    for options in [
        async_nats::ConnectOptions::new(),
        async_nats::ConnectOptions::with_user_and_password("publisher".into(), "wrong".into()),
    ] {
        let refused = options
            .connection_timeout(Duration::from_secs(5))
            .connect(&address)
            .await;
        let error = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.to_lowercase().contains("authorization"),
            "let in: {error:?}"
        );
    }

    // A publisher appends an event (with a JetStream ack) and Grizzly handles it.
    let publisher = async_nats::ConnectOptions::with_user_and_password(
        "publisher".into(),
        PUBLISHER_PASSWORD.into(),
    )
    .connect(&address)
    .await?;
    let js = async_nats::jetstream::new(publisher.clone());
    js.publish("events.agent.a1.ping", r#"{"x":1}"#.into())
        .await?
        .await?;
    let done = watch
        .wait_for_type("handler_succeeded", 1, DEADLINE)
        .await?;
    assert_eq!(done[0].subject, "events.agent.a1.handler_succeeded");

    // It cannot write tasks, forge outcomes, control workflows, or read the KV buckets.
    for subject in [
        "tasks.echo.0",
        "events.agent.a1.handler_succeeded",
        "events.workflow.w1.cancel_requested",
        "events.system.s1.breaker_opened",
    ] {
        publisher.publish(subject, "{}".into()).await?;
    }
    publisher.flush().await?;
    let api = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(publisher.clone());
    assert!(
        api.get_key_value("grizzly_leases").await.is_err(),
        "the publisher reached the JetStream API"
    );
    // A later allowed event from the same connection still gets in: the refusals were dropped
    // on the floor, not queued. Once it is handled, the denied ones would have been stored.
    js.publish("events.agent.a2.ping", "{}".into())
        .await?
        .await?;
    watch
        .wait_until(DEADLINE, |s| {
            s.iter()
                .any(|e| e.subject == "events.agent.a2.handler_succeeded")
        })
        .await?;
    assert_eq!(stored(&env, TASKS_STREAM, "tasks.echo.0").await?, 0);
    // One outcome for a1 (Grizzly's own), no workflow or system event at all.
    assert_eq!(
        stored(&env, EVENTS_STREAM, "events.agent.a1.handler_succeeded").await?,
        1
    );
    assert_eq!(stored(&env, EVENTS_STREAM, "events.workflow.>").await?, 0);
    assert_eq!(stored(&env, EVENTS_STREAM, "events.system.>").await?, 0);
    Ok(())
}

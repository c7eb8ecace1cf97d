//! `claude`: a warm pool of Claude Code processes (in progress).

use futures::future::BoxFuture;
use grizzly_shared::Settings;
use grizzly_shared::handler::LoadedHandler;

use super::{HandlerResult, Invocation, InvokeError, Runtime};

pub struct ClaudeRuntime;

impl ClaudeRuntime {
    pub fn new(_handler: &LoadedHandler, _settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self)
    }
}

impl Runtime for ClaudeRuntime {
    fn invoke<'a>(&'a self, _invocation: Invocation<'a>) -> BoxFuture<'a, Result<HandlerResult, InvokeError>> {
        Box::pin(async { Err(InvokeError::Start("claude runtime not built yet".into())) })
    }
}

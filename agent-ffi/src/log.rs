//! The log callback: the engine logs with `tracing`; each entry point installs this
//! handle's subscriber for the length of the call (`dispatcher::with_default`), so
//! every handle's lines go to its own callback and nothing global is touched.

use std::ffi::c_void;
use std::fmt::Write as _;
use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Level, Metadata, Subscriber};

use crate::{ZtnaLogFn, ZtnaLogLevel, c_line};

#[derive(Clone, Copy)]
struct Sink {
    f: ZtnaLogFn,
    ctx: *mut c_void,
    max: ZtnaLogLevel,
}

// SAFETY: the callback is only called from entry points, on the caller's thread;
// `Dispatch` requires Send + Sync, but the sink never crosses threads by itself.
unsafe impl Send for Sink {}
// SAFETY: as above.
unsafe impl Sync for Sink {}

impl Sink {
    fn emit(&self, level: ZtnaLogLevel, msg: &str) {
        if level > self.max {
            return;
        }
        if let Some(f) = self.f {
            let line = c_line(msg);
            // SAFETY: the callback and context came from the configuration; the
            // string lives through the call.
            unsafe { f(self.ctx, level, line.as_ptr()) };
        }
    }
}

pub struct Logger {
    sink: Sink,
    dispatch: Dispatch,
}

impl Logger {
    pub fn new(f: ZtnaLogFn, ctx: *mut c_void, max: ZtnaLogLevel) -> Self {
        let sink = Sink { f, ctx, max };
        Logger {
            sink,
            dispatch: Dispatch::new(Callback(Arc::new(sink))),
        }
    }

    pub fn dispatch(&self) -> Dispatch {
        self.dispatch.clone()
    }

    pub fn line(&self, level: ZtnaLogLevel, msg: &str) {
        self.sink.emit(level, msg);
    }
}

struct Callback(Arc<Sink>);

fn level(l: &Level) -> ZtnaLogLevel {
    match *l {
        Level::ERROR => ZtnaLogLevel::Error,
        Level::WARN => ZtnaLogLevel::Warn,
        Level::INFO => ZtnaLogLevel::Info,
        Level::DEBUG => ZtnaLogLevel::Debug,
        _ => ZtnaLogLevel::Trace,
    }
}

/// `message` first, then `key=value` for the other fields.
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for Callback {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // Other handles (and the host's own subscriber) may want other levels:
        // decide per event.
        Interest::sometimes()
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.0.f.is_some() && level(meta.level()) <= self.0.max
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line(String::new());
        event.record(&mut line);
        let meta = event.metadata();
        self.0.emit(
            level(meta.level()),
            &format!("{}: {}", meta.target(), line.0),
        );
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

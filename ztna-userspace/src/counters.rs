//! Counter structs for the daemons: one `AtomicU64` per named event, readable while
//! the daemon runs, as JSON (the stats file) and as Prometheus counters (each field
//! `f` of a struct exported with prefix `p` is `ztna_<p>_<f>_total`, its doc comment
//! the help text).

/// Declares a counters struct: `counters!(Name { /// doc \n field, ... })`.
#[macro_export]
macro_rules! counters {
    ($name:ident { $($(#[doc = $doc:literal])* $field:ident),* $(,)? }) => {
        /// Counters, readable while the daemon runs.
        #[derive(Debug, Default)]
        pub struct $name { $($(#[doc = $doc])* pub $field: std::sync::atomic::AtomicU64,)* }
        #[allow(dead_code)]
        impl $name {
            pub fn snapshot(&self) -> serde_json::Value {
                let mut m = serde_json::Map::new();
                $(m.insert(
                    stringify!($field).into(),
                    self.$field.load(std::sync::atomic::Ordering::Relaxed).into(),
                );)*
                serde_json::Value::Object(m)
            }
        }
        impl $crate::counters::Counters for $name {
            fn each(&self, f: &mut dyn FnMut(&'static str, &'static str, u64)) {
                $(f(
                    stringify!($field),
                    concat!($($doc, " "),*),
                    self.$field.load(std::sync::atomic::Ordering::Relaxed),
                );)*
            }
        }
    };
}

/// Visits every counter: name, help (its doc comment, possibly empty), value.
pub trait Counters: Send + Sync + std::fmt::Debug + 'static {
    fn each(&self, f: &mut dyn FnMut(&'static str, &'static str, u64));
}

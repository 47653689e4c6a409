//! The rule file's shape as serde reads it, and where a node of it sits.
//!
//! Leaves are kept as text so that every bad value can be reported, not
//! only the first one serde would stop at.

use serde::de;
use serde::Deserialize;

/// A key that may be absent, present with no value (`key:`), or set. An empty
/// value is an error rather than the default: `clients:` with the list
/// forgotten must not mean "any client".
#[derive(Debug, Default)]
pub(super) enum Field<T> {
    #[default]
    Absent,
    Null,
    Set(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Field::Null,
            Some(v) => Field::Set(v),
        })
    }
}

/// A scalar as written. YAML may resolve `21` to a number and `yes` to a
/// string; validation parses the text either way.
#[derive(Debug)]
pub(super) struct Text(pub(super) String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a single value (text or number)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `listeners`, `data`, `limits` and `rules`"
)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) instance: Field<Text>,
    #[serde(default)]
    pub(super) listeners: Field<Vec<RawListener>>,
    #[serde(default)]
    pub(super) data: Field<RawData>,
    #[serde(default)]
    pub(super) limits: Field<RawLimits>,
    #[serde(default)]
    pub(super) rules: Field<Vec<RawRule>>,
    #[serde(default)]
    pub(super) metrics: Field<RawMetrics>,
    #[serde(default)]
    pub(super) audit: Field<RawAudit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `metrics` section)")]
pub(super) struct RawMetrics {
    #[serde(default)]
    pub(super) listen: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `audit` section)")]
pub(super) struct RawAudit {
    #[serde(default)]
    pub(super) path: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a listener: a mapping with `name`, `listen`, `mode`, ..."
)]
pub(super) struct RawListener {
    #[serde(default)]
    pub(super) name: Field<Text>,
    #[serde(default)]
    pub(super) listen: Field<Text>,
    #[serde(default)]
    pub(super) mode: Field<Text>,
    #[serde(default)]
    pub(super) upstream: Field<Text>,
    #[serde(default)]
    pub(super) announce: Field<Text>,
    #[serde(default)]
    pub(super) proxy_protocol: Field<RawProxyProtocol>,
    #[serde(default)]
    pub(super) upstream_proxy_protocol: Field<Text>,
    #[serde(default)]
    pub(super) tls: Field<super::tls::RawListenerTls>,
    #[serde(default)]
    pub(super) upstream_tls: Field<super::tls::RawUpstreamTls>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping (a listener's `proxy_protocol`: `from` and `timeout`)"
)]
pub(super) struct RawProxyProtocol {
    #[serde(default)]
    pub(super) from: Field<Vec<Text>>,
    #[serde(default)]
    pub(super) timeout: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `data` section)")]
pub(super) struct RawData {
    #[serde(default)]
    pub(super) backend: Field<Text>,
    #[serde(default)]
    pub(super) client_ports: Field<Text>,
    #[serde(default)]
    pub(super) server_ports: Field<Text>,
    #[serde(default)]
    pub(super) pinhole_timeout: Field<Text>,
    #[serde(default)]
    pub(super) nftables_table: Field<Text>,
    #[serde(default)]
    pub(super) conntrack_mark: Field<Text>,
    #[serde(default)]
    pub(super) max_ports_per_client: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `limits` section)")]
pub(super) struct RawLimits {
    #[serde(default)]
    pub(super) max_sessions: Field<Text>,
    #[serde(default)]
    pub(super) max_sessions_per_client: Field<Text>,
    #[serde(default)]
    pub(super) idle_timeout: Field<Text>,
    #[serde(default)]
    pub(super) connect_timeout: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a rule: a mapping with `name`, `clients`, `servers`, `action`, ..."
)]
pub(super) struct RawRule {
    #[serde(default)]
    pub(super) name: Field<Text>,
    #[serde(default)]
    pub(super) clients: Field<Vec<Text>>,
    #[serde(default)]
    pub(super) servers: Field<Vec<Text>>,
    #[serde(default)]
    pub(super) action: Field<Text>,
    #[serde(default)]
    pub(super) modes: Field<Vec<Text>>,
    #[serde(default)]
    pub(super) server_mode: Field<Text>,
    #[serde(default)]
    pub(super) data_ports: Field<Text>,
    #[serde(default)]
    pub(super) tls: Field<Text>,
    #[serde(default)]
    pub(super) deny_commands: Field<Vec<Text>>,
    #[serde(default)]
    pub(super) require_tls: Field<Text>,
    #[serde(default)]
    pub(super) require_prot_p: Field<Text>,
}

/// One step of a path into the document: a mapping key or a list index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seg {
    Key(&'static str),
    Index(usize),
}

impl From<&'static str> for Seg {
    fn from(k: &'static str) -> Self {
        Seg::Key(k)
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

/// `path` one step further down.
pub(super) fn at(path: &[Seg], seg: impl Into<Seg>) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(seg.into());
    p
}

// Locating a path. serde_yaml exposes no spans, but it stamps an error raised
// while a node is deserialised with that node's position. So to find a node,
// walk to it through a second parse and raise a marked error there.

const LOCATE_MARK: &str = "ftpgate-locate-mark";

/// 1-based (line, column) of the node at `path`, or of its nearest ancestor
/// that can be found; (0, 0) if none can.
pub(super) fn locate(text: &str, path: &[Seg]) -> (usize, usize) {
    for len in (0..=path.len()).rev() {
        let seek = Seek(&path[..len]);
        if let Err(e) =
            de::DeserializeSeed::deserialize(seek, serde_yaml::Deserializer::from_str(text))
        {
            if e.to_string().contains(LOCATE_MARK) {
                if let Some(l) = e.location() {
                    return (l.line(), l.column());
                }
            }
        }
    }
    (0, 0)
}

struct Seek<'p>(&'p [Seg]);

impl<'de> de::DeserializeSeed<'de> for Seek<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // Raise the error inside the node's own deserialize call, so it is
        // stamped with the node's position rather than its parent's.
        d.deserialize_any(self)
    }
}

impl Seek<'_> {
    fn arrived<E: de::Error>(&self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(LOCATE_MARK))
        } else {
            Ok(())
        }
    }
}

impl<'de> de::Visitor<'de> for Seek<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.arrived()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.arrived()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.arrived()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.arrived()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.arrived()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.arrived()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.arrived()
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Seg::Index(want), rest)) = self.0.split_first() else {
            return self.arrived();
        };
        let mut i = 0;
        loop {
            if i == *want {
                return seq.next_element_seed(Seek(rest)).map(|_| ());
            }
            if seq.next_element::<de::IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Seg::Key(want), rest)) = self.0.split_first() else {
            return self.arrived();
        };
        while let Some(key) = map.next_key::<KeyName>()? {
            if key.0.as_deref() == Some(*want) {
                return map.next_value_seed(Seek(rest));
            }
            map.next_value::<de::IgnoredAny>()?;
        }
        Ok(())
    }
}

/// A mapping key as text, or `None` for a key that is not a plain string.
struct KeyName(Option<String>);

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = KeyName;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyName, E> {
                Ok(KeyName(Some(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<KeyName, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(KeyName(None))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<KeyName, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(KeyName(None))
            }
        }
        d.deserialize_any(V)
    }
}

//! Shards: which aggregator scrapes which targets. `index/count` assigns a target to shard
//! `hashmod(target key, count)`, the value Prometheus's `hashmod` relabel action computes
//! (the last 8 bytes of the MD5 of the value, big-endian, modulo `count`), so `count`
//! aggregators with indices `0..count` cover every target exactly once, and a Prometheus
//! sharded the same way agrees with them.

use std::fmt;
use std::str::FromStr;

use md5::{Digest, Md5};

/// This aggregator's slice of the targets: shard `index` of `count` (0-based, as the
/// `hashmod` value is). `0/1` is the whole fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardSpec {
    pub index: u32,
    pub count: u32,
}

impl Default for ShardSpec {
    fn default() -> Self {
        ShardSpec { index: 0, count: 1 }
    }
}

/// Why a shard spec was refused; the message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("{0:?} is not INDEX/COUNT (e.g. \"0/2\": shard 0 of 2)")]
    Syntax(String),
    #[error("{0:?}: the shard count must be at least 1")]
    NoShards(String),
    #[error("{spec:?}: the index is the target's hashmod value, 0 to {max} for {count} shards")]
    IndexTooLarge { spec: String, max: u32, count: u32 },
}

/// The `hashmod` value of `value` for `modulus` shards (Prometheus's relabel action).
pub fn hashmod(value: &str, modulus: u32) -> u32 {
    let sum = Md5::digest(value.as_bytes());
    let tail: [u8; 8] = sum[8..16].try_into().expect("an MD5 sum has 16 bytes");
    (u64::from_be_bytes(tail) % u64::from(modulus.max(1))) as u32
}

impl ShardSpec {
    /// Whether the target known as `key` (its ledger key, [`crate::aggregator::targets::Target::key`])
    /// is this shard's.
    pub fn owns(&self, key: &str) -> bool {
        self.count <= 1 || hashmod(key, self.count) == self.index
    }

    pub fn is_whole(&self) -> bool {
        self.count == 1
    }
}

impl FromStr for ShardSpec {
    type Err = ShardError;

    fn from_str(s: &str) -> Result<Self, ShardError> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| ShardError::Syntax(s.to_string()))?;
        let parse = |x: &str| {
            x.trim()
                .parse::<u32>()
                .map_err(|_| ShardError::Syntax(s.to_string()))
        };
        let (index, count) = (parse(i)?, parse(n)?);
        if count == 0 {
            return Err(ShardError::NoShards(s.to_string()));
        }
        if index >= count {
            return Err(ShardError::IndexTooLarge {
                spec: s.to_string(),
                max: count - 1,
                count,
            });
        }
        Ok(ShardSpec { index, count })
    }
}

impl fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        assert_eq!("2/4".parse(), Ok(ShardSpec { index: 2, count: 4 }));
        assert_eq!("0/1".parse(), Ok(ShardSpec::default()));
        assert!(matches!(
            "5/4".parse::<ShardSpec>(),
            Err(ShardError::IndexTooLarge { max: 3, .. })
        ));
        assert!(matches!(
            "4/4".parse::<ShardSpec>(),
            Err(ShardError::IndexTooLarge { .. })
        ));
        assert_eq!(
            "0/0".parse::<ShardSpec>(),
            Err(ShardError::NoShards("0/0".into()))
        );
        for bad in ["", "2", "a/4", "2/b", "-1/4", "1/2/3"] {
            assert!(
                matches!(bad.parse::<ShardSpec>(), Err(ShardError::Syntax(_))),
                "{bad}"
            );
        }
        let msg = "5/4".parse::<ShardSpec>().unwrap_err().to_string();
        assert!(msg.contains("0 to 3"), "{msg}");
    }

    /// Values computed independently: `printf %s VALUE | md5sum`, the last 16 hex digits as
    /// an unsigned 64-bit integer, modulo the count (what Prometheus's relabel does).
    #[test]
    fn hashmod_is_prometheus_hashmod() {
        for (value, modulus) in [("gpu-001:9473", 4u32), ("10.0.0.7:9473", 2), ("", 3)] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s '{value}' | md5sum"))
                .output()
                .expect("md5sum");
            let hex = String::from_utf8(out.stdout).unwrap();
            let tail = u64::from_str_radix(&hex[16..32], 16).unwrap();
            assert_eq!(hashmod(value, modulus), (tail % u64::from(modulus)) as u32);
        }
    }

    proptest! {
        /// N shards cover every target once: no overlap, no gap.
        #[test]
        fn shards_partition_the_targets(keys in proptest::collection::vec("[a-z0-9.:-]{1,24}", 1..64), count in 1u32..9) {
            for k in &keys {
                let owners = (0..count).filter(|&i| ShardSpec { index: i, count }.owns(k)).count();
                prop_assert_eq!(owners, 1);
            }
        }
    }
}

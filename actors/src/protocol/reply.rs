//! What a fenced commit script answers ([`Reply`]), read from Redis's reply.

use anyhow::Context as _;

/// Why a commit was not applied. Nothing of it was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("partition {partition} was claimed again (stored epoch {stored}); this instance no longer owns it")]
    StaleEpoch { partition: i32, stored: i64 },
    #[error("partition {partition}'s stored fence is {stored}, not where this commit starts")]
    NotContiguous { partition: i32, stored: i64 },
    #[error("partition {partition}'s fences are gone from Redis (restarted empty or flushed?)")]
    FencesMissing { partition: i32 },
}

impl Rejection {
    /// Every [`Rejection::reason`], for metrics exported from the start.
    pub const REASONS: [&'static str; 3] = ["stale_epoch", "not_contiguous", "fences_missing"];

    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::StaleEpoch { .. } => "stale_epoch",
            Rejection::NotContiguous { .. } => "not_contiguous",
            Rejection::FencesMissing { .. } => "fences_missing",
        }
    }
}

/// A key Redis refused to write, as a commit script reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub key: String,
    /// `wrong_type`, `not_an_integer`, `overflow`, `reserved_key` or `other`.
    pub reason: String,
    /// Values (list items, or the increment) that were not stored.
    pub lost: i64,
}

/// What a fenced commit script did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Applied now: the script's own figure (its operations), how many writes Redis
    /// refused, and the first of them.
    Applied {
        ops: i64,
        conflicts: i64,
        first: Vec<Conflict>,
    },
    /// Applied before: the fences stood at this commit's ends already (a retry after
    /// a reply that was lost, e.g. to a timeout). Nothing was written again.
    AppliedBefore,
    Rejected(Rejection),
}

fn int(value: &redis::Value) -> anyhow::Result<i64> {
    redis::from_redis_value_ref(value).context("a number in a commit script's reply")
}

/// Reads a commit script's reply: `{0, ops[, conflicts, key, reason, lost, …]}`
/// applied, `{0, -1}` applied before, or `{code, partition, stored}` refused.
pub fn parse(value: &redis::Value) -> anyhow::Result<Reply> {
    let redis::Value::Array(items) = value else {
        anyhow::bail!("unexpected reply from a commit script: {value:?}");
    };
    let code = int(items
        .first()
        .context("an empty reply from a commit script")?)?;
    if code == 0 {
        let ops = int(items
            .get(1)
            .context("a commit script's reply without its figure")?)?;
        if ops == -1 {
            return Ok(Reply::AppliedBefore);
        }
        let conflicts = items.get(2).map(int).transpose()?.unwrap_or(0);
        let first = items[3.min(items.len())..]
            .chunks(3)
            .map(|c| -> anyhow::Result<Conflict> {
                let [key, reason, lost] = c else {
                    anyhow::bail!("a truncated conflict in a commit script's reply");
                };
                Ok(Conflict {
                    key: redis::from_redis_value_ref(key).context("a conflict's key")?,
                    reason: redis::from_redis_value_ref(reason).context("a conflict's reason")?,
                    lost: int(lost)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        return Ok(Reply::Applied {
            ops,
            conflicts,
            first,
        });
    }
    let (partition, stored) = match items.as_slice() {
        [_, partition, stored] => (int(partition)? as i32, int(stored)?),
        other => anyhow::bail!("unexpected reply from a commit script: {other:?}"),
    };
    Ok(Reply::Rejected(match code {
        1 => Rejection::StaleEpoch { partition, stored },
        2 => Rejection::NotContiguous { partition, stored },
        3 => Rejection::FencesMissing { partition },
        other => anyhow::bail!("unexpected rejection code {other}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn array(items: &[redis::Value]) -> redis::Value {
        redis::Value::Array(items.to_vec())
    }

    fn ints(items: &[i64]) -> redis::Value {
        array(
            &items
                .iter()
                .map(|i| redis::Value::Int(*i))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn replies_map_to_outcomes() {
        assert_eq!(
            parse(&ints(&[0, 7])).unwrap(),
            Reply::Applied {
                ops: 7,
                conflicts: 0,
                first: vec![]
            }
        );
        assert_eq!(parse(&ints(&[0, -1])).unwrap(), Reply::AppliedBefore);
        let text = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            parse(&array(&[
                redis::Value::Int(0),
                redis::Value::Int(9),
                redis::Value::Int(1),
                text("u1"),
                text("wrong_type"),
                redis::Value::Int(3),
            ]))
            .unwrap(),
            Reply::Applied {
                ops: 9,
                conflicts: 1,
                first: vec![Conflict {
                    key: "u1".into(),
                    reason: "wrong_type".into(),
                    lost: 3
                }]
            }
        );
        assert_eq!(
            parse(&ints(&[1, 2, 5])).unwrap(),
            Reply::Rejected(Rejection::StaleEpoch {
                partition: 2,
                stored: 5
            })
        );
        assert_eq!(
            parse(&ints(&[2, 0, 100])).unwrap(),
            Reply::Rejected(Rejection::NotContiguous {
                partition: 0,
                stored: 100
            })
        );
        assert_eq!(
            parse(&ints(&[3, 1, -1])).unwrap(),
            Reply::Rejected(Rejection::FencesMissing { partition: 1 })
        );
        assert!(parse(&ints(&[9, 9, 9])).is_err());
        assert!(parse(&ints(&[])).is_err());
        assert!(parse(&redis::Value::Okay).is_err());
    }
}

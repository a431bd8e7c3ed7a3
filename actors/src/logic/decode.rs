//! Decoding of austin `AnchorInfo` JSON records into [`TraceEvent`]s.
//!
//! Producers are lenient Java (fastjson): numbers may arrive as numeric strings and
//! receivers as strings or integers; unknown fields are ignored. Anything else that is
//! wrong becomes a [`DecodeError`] whose [`DecodeError::reason`] is a short, stable
//! label (the dead-letter `reason` column and the metric label) and whose `Display`
//! adds the detail. Decoding borrows from the record wherever the JSON has no escapes:
//! one `Vec` per event for `ids` is the only allocation on the happy path.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use serde::{Deserialize, Serialize};

/// The `[decode]` section: limits on what one record may cost.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeLimits {
    /// Records with a larger value are dead-lettered as `record_too_large`.
    pub max_record_bytes: usize,
    /// Records whose `ids` array has more receivers are dead-lettered as `too_many_ids`.
    pub max_ids: usize,
    /// Records whose JSON nests deeper are dead-lettered as `nesting_too_deep`.
    pub max_nesting_depth: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_record_bytes: 1 << 20,
            max_ids: 10_000,
            max_nesting_depth: 32,
        }
    }
}

/// One decoded trace event, borrowing from the record bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent<'a> {
    pub biz_id: Option<Cow<'a, str>>,
    pub message_id: Option<Cow<'a, str>>,
    pub ids: Vec<Cow<'a, str>>,
    pub state: i32,
    pub business_id: i64,
    pub log_timestamp: i64,
}

/// The known anchor state codes (austin `AnchorState`); others are kept but counted.
pub const KNOWN_STATES: [i32; 10] = [10, 20, 22, 24, 30, 40, 50, 60, 64, 70];

/// Whether `state` is one of austin's anchor state codes.
pub fn is_known_state(state: i32) -> bool {
    KNOWN_STATES.contains(&state)
}

/// Why a record was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no value (tombstone or empty)")]
    EmptyPayload,
    #[error("record is {size} bytes, over the {limit}-byte limit")]
    RecordTooLarge { size: usize, limit: usize },
    #[error("record is not valid UTF-8: {0}")]
    InvalidUtf8(String),
    #[error("JSON nests deeper than {limit} levels")]
    NestingTooDeep { limit: usize },
    #[error("record is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("record is JSON but not an object")]
    NotAnObject,
    #[error("required field `{0}` is missing")]
    MissingField(&'static str),
    #[error("a field has the wrong type or is out of range: {0}")]
    WrongType(String),
    #[error("`ids` has {count} receivers, over the limit of {limit}")]
    TooManyIds { count: usize, limit: usize },
    #[error("logTimestamp {ts} is {ahead_ms} ms ahead of processing time, over time.max_future_ms ({limit})")]
    TimestampInFuture { ts: i64, ahead_ms: i64, limit: u64 },
    #[error("logTimestamp {ts} is {behind_ms} ms behind processing time, over time.max_past_ms ({limit})")]
    TimestampTooOld { ts: i64, behind_ms: i64, limit: u64 },
    /// Not the record's fault: processing it made anchorflow panic (a bug to report).
    /// Its bytes are kept here rather than stop the partition.
    #[error("processing this record panicked: {0}")]
    Panicked(String),
}

impl DecodeError {
    /// A short, stable, low-cardinality label for metrics and the dead-letter table.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::EmptyPayload => "empty_payload",
            DecodeError::RecordTooLarge { .. } => "record_too_large",
            DecodeError::InvalidUtf8(_) => "invalid_utf8",
            DecodeError::NestingTooDeep { .. } => "nesting_too_deep",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::WrongType(_) => "wrong_type",
            DecodeError::TooManyIds { .. } => "too_many_ids",
            DecodeError::TimestampInFuture { .. } => "timestamp_in_future",
            DecodeError::TimestampTooOld { .. } => "timestamp_too_old",
            DecodeError::Panicked(_) => "processing_panic",
        }
    }

    /// Every label [`DecodeError::reason`] can return, for pre-registering metrics.
    pub const REASONS: [&'static str; 12] = [
        "empty_payload",
        "record_too_large",
        "invalid_utf8",
        "nesting_too_deep",
        "invalid_json",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "too_many_ids",
        "timestamp_in_future",
        "timestamp_too_old",
        "processing_panic",
    ];
}

/// How far from processing time an event time may be (`time.max_future_ms`,
/// `time.max_past_ms`; 0 disables a bound).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeBounds {
    pub max_future_ms: u64,
    pub max_past_ms: u64,
}

impl TimeBounds {
    /// Checks an event time against processing time `now_ms`.
    pub fn check(&self, ts: i64, now_ms: i64) -> Result<(), DecodeError> {
        let ahead_ms = ts.saturating_sub(now_ms);
        if self.max_future_ms > 0 && ahead_ms > self.max_future_ms as i64 {
            return Err(DecodeError::TimestampInFuture {
                ts,
                ahead_ms,
                limit: self.max_future_ms,
            });
        }
        let behind_ms = now_ms.saturating_sub(ts);
        if self.max_past_ms > 0 && behind_ms > self.max_past_ms as i64 {
            return Err(DecodeError::TimestampTooOld {
                ts,
                behind_ms,
                limit: self.max_past_ms,
            });
        }
        Ok(())
    }
}

/// Decodes one record value under the configured limits.
pub fn decode<'a>(
    payload: Option<&'a [u8]>,
    limits: &DecodeLimits,
) -> Result<TraceEvent<'a>, DecodeError> {
    let bytes = match payload {
        Some(bytes) if !bytes.is_empty() => bytes,
        _ => return Err(DecodeError::EmptyPayload),
    };
    if bytes.len() > limits.max_record_bytes {
        return Err(DecodeError::RecordTooLarge {
            size: bytes.len(),
            limit: limits.max_record_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidUtf8(e.to_string()))?;
    check_depth(text.as_bytes(), limits.max_nesting_depth)?;
    if !text.trim_start().starts_with('{') {
        // serde would read a struct from an array too; austin records are objects only.
        return match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => Err(DecodeError::NotAnObject),
            Err(e) => Err(DecodeError::InvalidJson(e.to_string())),
        };
    }
    let raw: RawEvent<'a> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) if e.is_data() => return Err(DecodeError::WrongType(e.to_string())),
        Err(e) => return Err(DecodeError::InvalidJson(e.to_string())),
    };
    let ids = raw.ids.ok_or(DecodeError::MissingField("ids"))?;
    if ids.over_limit {
        return Err(DecodeError::TooManyIds {
            count: ids.count,
            limit: limits.max_ids,
        });
    }
    let state = raw.state.ok_or(DecodeError::MissingField("state"))?.0;
    let state = i32::try_from(state)
        .map_err(|_| DecodeError::WrongType(format!("state {state} is out of range")))?;
    let business_id = raw
        .business_id
        .ok_or(DecodeError::MissingField("businessId"))?
        .0;
    let log_timestamp = raw
        .log_timestamp
        .ok_or(DecodeError::MissingField("logTimestamp"))?
        .0;
    if ids.items.len() > limits.max_ids {
        return Err(DecodeError::TooManyIds {
            count: ids.items.len(),
            limit: limits.max_ids,
        });
    }
    Ok(TraceEvent {
        biz_id: raw.biz_id,
        message_id: raw.message_id,
        ids: ids.items,
        state,
        business_id,
        log_timestamp,
    })
}

/// Rejects JSON nesting deeper than `limit` (strings are skipped, escapes honoured).
/// serde_json's own recursion limit (128) still backs it.
///
/// The depth never exceeds the number of `{` and `[` bytes in the record, so a record
/// with no more of them than `limit` passes on one count, which the compiler
/// vectorises; austin's records have two. Only the others take the byte-at-a-time scan
/// that tells brackets in strings from the rest (it was a third of `decode`'s time).
fn check_depth(bytes: &[u8], limit: usize) -> Result<(), DecodeError> {
    let openers = bytes
        .iter()
        .map(|&b| usize::from(b == b'{' || b == b'['))
        .sum::<usize>();
    if openers <= limit {
        return Ok(());
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return Err(DecodeError::NestingTooDeep { limit });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "bizId", borrow, default, deserialize_with = "opt_text")]
    biz_id: Option<Cow<'a, str>>,
    #[serde(rename = "messageId", borrow, default, deserialize_with = "opt_text")]
    message_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    ids: Option<Ids<'a>>,
    #[serde(default)]
    state: Option<Lenient>,
    #[serde(rename = "businessId", default)]
    business_id: Option<Lenient>,
    #[serde(rename = "logTimestamp", default)]
    log_timestamp: Option<Lenient>,
}

/// An integer that may be spelled as a JSON number or a numeric string.
struct Lenient(i64);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LenientVisitor;
        impl Visitor<'_> for LenientVisitor {
            type Value = Lenient;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string holding one")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Lenient, E> {
                Ok(Lenient(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Lenient, E> {
                i64::try_from(v)
                    .map(Lenient)
                    .map_err(|_| E::custom(format!("{v} is out of range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Lenient, E> {
                v.trim()
                    .parse::<i64>()
                    .map(Lenient)
                    .map_err(|_| E::custom(format!("`{v}` is not an integer")))
            }
        }
        deserializer.deserialize_any(LenientVisitor)
    }
}

/// Optional text that accepts a string, or a number rendered as text (fastjson writes
/// numeric ids unquoted).
fn opt_text<'de: 'a, 'a, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'a, str>>, D::Error> {
    Option::<Text<'a>>::deserialize(deserializer).map(|t| t.map(|t| t.0))
}

struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_any(TextVisitor(std::marker::PhantomData))
    }
}

/// The `ids` array. Counting stops keeping items past a hard cap so that a huge array
/// cannot make decoding allocate without bound; the configured limit is checked after.
struct Ids<'a> {
    items: Vec<Cow<'a, str>>,
    count: usize,
    over_limit: bool,
}

/// Receivers kept per record at most, whatever the configuration says: beyond this a
/// record is rejected while it is still being parsed.
const HARD_ID_CAP: usize = 1_000_000;

impl<'de: 'a, 'a> Deserialize<'de> for Ids<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdsVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for IdsVisitor<'a> {
            type Value = Ids<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of strings or integers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ids<'a>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(64));
                let mut count = 0;
                while let Some(item) = seq.next_element::<Text<'a>>()? {
                    count += 1;
                    if count <= HARD_ID_CAP {
                        items.push(item.0);
                    }
                }
                Ok(Ids {
                    items,
                    count,
                    over_limit: count > HARD_ID_CAP,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ids<'a>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Err(de::Error::custom("`ids` must be an array, found an object"))
            }
        }
        deserializer.deserialize_any(IdsVisitor(std::marker::PhantomData))
    }
}

/// The value pushed onto receiver and message lists: austin's `SimpleAnchorInfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceValue {
    pub state: i32,
    pub business_id: i64,
    pub timestamp: i64,
}

/// The values one list key gets in one checkpoint, oldest first. Most keys get one (a
/// message id, a receiver seen once), held inline: no allocation per key.
pub type TraceValues = smallvec::SmallVec<[TraceValue; 1]>;

impl TraceValue {
    /// `{"state":S,"businessId":B,"timestamp":T}`, exactly these keys in this order.
    pub fn to_json(&self) -> String {
        let mut json = String::with_capacity(64);
        self.write_json(&mut json);
        json
    }

    /// Appends [`TraceValue::to_json`] to `out`: straight into a commit's arguments,
    /// with `itoa` rather than `fmt`: every receiver's value is written this way.
    pub fn write_json(&self, out: &mut String) {
        let mut number = itoa::Buffer::new();
        out.push_str(r#"{"state":"#);
        out.push_str(number.format(self.state));
        out.push_str(r#","businessId":"#);
        out.push_str(number.format(self.business_id));
        out.push_str(r#","timestamp":"#);
        out.push_str(number.format(self.timestamp));
        out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_record_bytes: 4096,
            max_ids: 5,
            max_nesting_depth: 8,
        }
    }

    fn ok(json: &str) -> TraceEvent<'_> {
        decode(Some(json.as_bytes()), &limits()).expect("decodes")
    }

    fn reason(json: &[u8]) -> &'static str {
        decode(Some(json), &limits())
            .expect_err("rejected")
            .reason()
    }

    #[test]
    fn decodes_both_forms_seen_in_the_wild() {
        let lenient = ok(r#"{"state":"1","businessId":"2","ids":[1,2,3],"logTimestamp":"123123"}"#);
        assert_eq!(lenient.state, 1);
        assert_eq!(lenient.business_id, 2);
        assert_eq!(lenient.log_timestamp, 123123);
        assert_eq!(lenient.ids, vec!["1", "2", "3"]);
        assert_eq!(lenient.biz_id, None);

        let strict = ok(
            r#"{"bizId":"b1","messageId":"Xk3v","ids":["13800000000"],"state":60,"businessId":1000001220231120,"logTimestamp":1700450000123}"#,
        );
        assert_eq!(strict.biz_id.as_deref(), Some("b1"));
        assert_eq!(strict.message_id.as_deref(), Some("Xk3v"));
        assert_eq!(strict.ids, vec!["13800000000"]);
        assert_eq!(strict.business_id, 1000001220231120);
        assert!(
            matches!(strict.ids[0], Cow::Borrowed(_)),
            "plain strings are borrowed"
        );
    }

    #[test]
    fn unknown_fields_and_escapes_are_fine() {
        let event = ok(
            r#"{"x":{"deep":[1,2]},"ids":["a\"b"],"state":10,"businessId":5,"logTimestamp":7,"extra":null}"#,
        );
        assert_eq!(event.ids, vec!["a\"b"]);
        let event =
            ok(r#"{"ids":[],"state":" 10 ","businessId":5,"logTimestamp":7,"messageId":null}"#);
        assert_eq!(event.state, 10);
        assert!(event.ids.is_empty());
    }

    #[test]
    fn every_bad_shape_has_its_own_reason() {
        assert_eq!(
            decode(None, &limits()).unwrap_err().reason(),
            "empty_payload"
        );
        assert_eq!(reason(b""), "empty_payload");
        assert_eq!(reason(&vec![b' '; 5000]), "record_too_large");
        assert_eq!(reason(b"{\"ids\":[\"\xff\"]}"), "invalid_utf8");
        assert_eq!(reason(b"{\"a\":[[[[[[[[[[1]]]]]]]]]]}"), "nesting_too_deep");
        assert_eq!(reason(b"{\"ids\": [1,"), "invalid_json");
        assert_eq!(reason(b"not json"), "invalid_json");
        assert_eq!(reason(b"[1,2]"), "not_an_object");
        assert_eq!(reason(b"42"), "not_an_object");
        assert_eq!(
            reason(br#"{"state":1,"businessId":2,"logTimestamp":3}"#),
            "missing_field"
        );
        assert_eq!(
            reason(br#"{"ids":[1],"businessId":2,"logTimestamp":3}"#),
            "missing_field"
        );
        assert_eq!(
            reason(br#"{"ids":[1],"state":1,"logTimestamp":3}"#),
            "missing_field"
        );
        assert_eq!(
            reason(br#"{"ids":[1],"state":1,"businessId":2}"#),
            "missing_field"
        );
        assert_eq!(
            reason(br#"{"ids":[1],"state":"x","businessId":2,"logTimestamp":3}"#),
            "wrong_type"
        );
        assert_eq!(
            reason(br#"{"ids":[1],"state":1.5,"businessId":2,"logTimestamp":3}"#),
            "wrong_type"
        );
        assert_eq!(
            reason(br#"{"ids":"1","state":1,"businessId":2,"logTimestamp":3}"#),
            "wrong_type"
        );
        assert_eq!(
            reason(br#"{"ids":[[1]],"state":1,"businessId":2,"logTimestamp":3}"#),
            "wrong_type"
        );
        assert_eq!(
            reason(br#"{"ids":[1],"state":99999999999,"businessId":2,"logTimestamp":3}"#),
            "wrong_type"
        );
        assert_eq!(
            reason(br#"{"ids":[1],"state":1,"businessId":18446744073709551615,"logTimestamp":3}"#),
            "wrong_type"
        );
        assert_eq!(
            reason(br#"{"ids":[1,2,3,4,5,6],"state":1,"businessId":2,"logTimestamp":3}"#),
            "too_many_ids"
        );
        for reason in DecodeError::REASONS {
            assert!(!reason.is_empty());
        }
    }

    #[test]
    fn nesting_is_allowed_up_to_the_limit_and_not_one_level_more() {
        // limits() allows 8 levels: the object and 7 arrays, then the object and 8.
        let at_limit =
            r#"{"x":[[[[[[[1]]]]]]],"ids":[],"state":1,"businessId":2,"logTimestamp":3}"#;
        assert_eq!(at_limit.matches(['{', '[']).count(), 9, "one more with ids");
        ok(at_limit);
        let at_limit = r#"{"x":[[[[[[[1]]]]]]],"ids":1,"state":1,"businessId":2,"logTimestamp":3}"#;
        assert_eq!(reason(at_limit.as_bytes()), "wrong_type", "not too deep");
        let over = br#"{"x":[[[[[[[[1]]]]]]]],"ids":1,"state":1,"businessId":2,"logTimestamp":3}"#;
        assert_eq!(reason(over), "nesting_too_deep");
        let over =
            br#"{"x":[[[[[[[[1]]]]]]]],"ids":[1],"state":1,"businessId":2,"logTimestamp":3}"#;
        assert_eq!(reason(over), "nesting_too_deep");
    }

    #[test]
    fn nesting_inside_strings_does_not_count() {
        ok(r#"{"note":"[[[[[[[[[[[[[[[[","ids":[1],"state":1,"businessId":2,"logTimestamp":3}"#);
    }

    #[test]
    fn known_states_are_austins() {
        assert!(is_known_state(60));
        assert!(!is_known_state(61));
    }

    #[test]
    fn trace_value_json_has_exactly_austins_keys() {
        let v = TraceValue {
            state: 60,
            business_id: 1000001220231120,
            timestamp: 1700450000123,
        };
        assert_eq!(
            v.to_json(),
            r#"{"state":60,"businessId":1000001220231120,"timestamp":1700450000123}"#
        );
        let extreme = TraceValue {
            state: i32::MIN,
            business_id: i64::MAX,
            timestamp: -1,
        };
        assert_eq!(
            extreme.to_json(),
            format!(
                r#"{{"state":{},"businessId":{},"timestamp":-1}}"#,
                i32::MIN,
                i64::MAX
            )
        );
        let json: serde_json::Value = serde_json::from_str(&v.to_json()).unwrap();
        let obj = json.as_object().unwrap();
        assert_eq!(obj.len(), 3);
        assert_eq!(obj["state"], 60);
        assert_eq!(obj["businessId"], 1000001220231120i64);
        assert_eq!(obj["timestamp"], 1700450000123i64);
    }
}

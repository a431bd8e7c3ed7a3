//! A generator of realistic austin trace events for the demo, the benchmark and tests:
//! many templates, a send funnel (received → deduplicated / night-shielded / filtered
//! → sent → clicked or failed), some multi-receiver fan-out, lenient-typed records as
//! fastjson writes them, and, on request, malformed records of every kind.
//!
//! It is deterministic for a seed. It only produces input; tests compute what the
//! outputs should be from the produced bytes with their own oracle.

/// xorshift64*: small, fast, deterministic; quality is ample for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent / 100`.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One generated record: the Kafka value and what it is.
#[derive(Clone, Debug)]
pub struct Generated {
    pub value: Option<Vec<u8>>,
    /// `None` for a well-formed event, or the reason it should be rejected.
    pub bad: Option<&'static str>,
}

#[derive(Clone, Debug)]
pub struct GeneratorConfig {
    pub seed: u64,
    /// Number of distinct templates.
    pub templates: u64,
    /// Event time of the first send, epoch ms.
    pub start_ms: i64,
    /// Milliseconds of event time between consecutive sends.
    pub step_ms: i64,
    /// Each send's event time is moved later by a uniform draw below this many
    /// milliseconds (0: sends in event-time order). Spread over hours, the rows of one
    /// checkpoint land in many `dt=/hour=` folders at once.
    pub spread_ms: u64,
    /// Per-mille of records that are malformed.
    pub bad_per_mille: u64,
    /// `decode.max_ids` of the pipeline, so that oversize arrays can be produced.
    pub max_ids: usize,
    /// What the traffic looks like.
    pub shape: Shape,
    /// austin's batch sends in place of the shape's own fan-out: a tenth of the sends
    /// go to 2–19 receivers at once, the rest to one.
    pub batch_sends: bool,
}

/// The kind of traffic generated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Shape {
    /// Sends that go through austin's funnel (2–3 events per message id) to receivers
    /// drawn from a few tens of thousands: many events per Redis key per checkpoint.
    #[default]
    Funnel,
    /// One event per send, every message id new, receivers drawn from `receivers`:
    /// about 2.4 new Redis keys per event, so Redis does most of the work.
    RedisHeavy { receivers: u64 },
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 42,
            templates: 24,
            start_ms: 1_700_450_000_000,
            step_ms: 7,
            spread_ms: 0,
            bad_per_mille: 5,
            max_ids: 10_000,
            shape: Shape::Funnel,
            batch_sends: false,
        }
    }
}

/// Produces records one send at a time (a send yields one record per funnel step).
pub struct Generator {
    config: GeneratorConfig,
    rng: Rng,
    sends: u64,
    queue: std::collections::VecDeque<Generated>,
}

/// austin template types: notice, marketing, verification code.
const TEMPLATE_TYPES: [i64; 3] = [10, 20, 30];

impl Generator {
    pub fn new(config: GeneratorConfig) -> Self {
        let rng = Rng::new(config.seed);
        Generator {
            config,
            rng,
            sends: 0,
            queue: Default::default(),
        }
    }

    /// The 16-digit businessId of template `index` on the day of `ts_ms` (UTC+8).
    pub fn business_id(index: u64, ts_ms: i64) -> i64 {
        let template_type = TEMPLATE_TYPES[(index % 3) as usize];
        let template_id = 100 + index as i64;
        let day = chrono::DateTime::from_timestamp_millis(ts_ms + 8 * 3_600_000)
            .map(|t| t.format("%Y%m%d").to_string())
            .unwrap_or_else(|| "19700101".into());
        let day: i64 = day.parse().unwrap_or(19700101);
        (template_type * 1_000_000 + template_id) * 100_000_000 + day
    }

    fn event(
        &mut self,
        message_id: &str,
        ids: &[String],
        state: i32,
        business_id: i64,
        ts: i64,
    ) -> Generated {
        let lenient = self.rng.chance(20);
        let ids_json = if lenient && ids.iter().all(|i| i.parse::<u64>().is_ok()) {
            format!("[{}]", ids.join(","))
        } else {
            format!(
                "[{}]",
                ids.iter()
                    .map(|i| format!("\"{i}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        let json = if lenient {
            format!(
                r#"{{"messageId":"{message_id}","ids":{ids_json},"state":"{state}","businessId":"{business_id}","logTimestamp":"{ts}","extra":{{"x":[1,2]}}}}"#
            )
        } else {
            format!(
                r#"{{"bizId":"biz-{}","messageId":"{message_id}","ids":{ids_json},"state":{state},"businessId":{business_id},"logTimestamp":{ts}}}"#,
                self.sends
            )
        };
        Generated {
            value: Some(json.into_bytes()),
            bad: None,
        }
    }

    fn malformed(&mut self) -> Generated {
        let (value, bad): (Option<Vec<u8>>, &'static str) = match self.rng.below(7) {
            0 => (Some(b"{\"ids\":[1,2".to_vec()), "invalid_json"),
            1 => (
                Some(br#"{"ids":["u1"],"businessId":1,"logTimestamp":1}"#.to_vec()),
                "missing_field",
            ),
            2 => (
                Some(br#"{"ids":["u1"],"state":"sent","businessId":1,"logTimestamp":1}"#.to_vec()),
                "wrong_type",
            ),
            3 => (
                Some(b"{\"ids\":[\"\xc3\x28\"],\"state\":10}".to_vec()),
                "invalid_utf8",
            ),
            4 => {
                let ids: Vec<String> = (0..=self.config.max_ids).map(|i| i.to_string()).collect();
                let json = format!(
                    r#"{{"ids":[{}],"state":10,"businessId":1,"logTimestamp":1}}"#,
                    ids.join(",")
                );
                (Some(json.into_bytes()), "too_many_ids")
            }
            5 => (None, "empty_payload"),
            _ => (
                Some(b"[\"not\",\"an\",\"object\"]".to_vec()),
                "not_an_object",
            ),
        };
        Generated {
            value,
            bad: Some(bad),
        }
    }

    /// Receivers of one send: the shape's own spread (`own`), or batch sends.
    fn fan_out(&mut self, own: fn(&mut Rng) -> u64) -> u64 {
        if !self.config.batch_sends {
            own(&mut self.rng)
        } else if self.rng.chance(90) {
            1
        } else {
            2 + self.rng.below(18)
        }
    }

    /// One `RedisHeavy` send: a single event with a new message id.
    fn enqueue_unique(&mut self, receivers: u64, ts: i64, business_id: i64) {
        let fan_out = self.fan_out(|rng| if rng.chance(85) { 1 } else { 2 + rng.below(3) });
        let ids: Vec<String> = (0..fan_out)
            .map(|_| format!("{}", 10_000_000 + self.rng.below(receivers)))
            .collect();
        let message_id = format!("u{:x}", self.sends);
        let event = self.event(&message_id, &ids, 10, business_id, ts);
        self.queue.push_back(event);
    }

    fn enqueue_send(&mut self) {
        self.sends += 1;
        let mut ts = self.config.start_ms + self.sends as i64 * self.config.step_ms;
        if self.config.spread_ms > 0 {
            ts += self.rng.below(self.config.spread_ms) as i64;
        }
        let template = self.rng.below(self.config.templates);
        let business_id = Self::business_id(template, ts);
        if let Shape::RedisHeavy { receivers } = self.config.shape {
            return self.enqueue_unique(receivers, ts, business_id);
        }
        let fan_out = self.fan_out(|rng| match rng.below(100) {
            0..=79 => 1,
            80..=94 => 2 + rng.below(3),
            _ => 5 + rng.below(20),
        });
        let ids: Vec<String> = (0..fan_out)
            .map(|_| match self.rng.below(3) {
                0 => format!("1380000{:04}", self.rng.below(5000)),
                1 => format!("user{}@example.com", self.rng.below(3000)),
                _ => format!("{}", 100_000 + self.rng.below(20_000)),
            })
            .collect();
        let message_id = format!("m{:x}", self.rng.next_u64() & 0xffff_ffff_ffff);
        let mut states = vec![10];
        match self.rng.below(100) {
            0..=1 => states.push(20),
            2..=4 => states.push(30),
            5..=6 => states.push(40),
            7 => states.push(if self.rng.chance(50) { 22 } else { 24 }),
            8 => states.push(50),
            _ => {
                states.push(60);
                if self.rng.chance(12) {
                    states.push(64);
                } else if self.rng.chance(4) {
                    states.push(70);
                }
            }
        }
        for (i, state) in states.into_iter().enumerate() {
            // Later funnel steps happen a little later, sometimes out of order.
            let jitter = self.rng.below(400) as i64 - 100;
            let event = self.event(
                &message_id,
                &ids,
                state,
                business_id,
                ts + i as i64 * 300 + jitter,
            );
            self.queue.push_back(event);
        }
        if self.config.bad_per_mille > 0 && self.rng.below(1000) < self.config.bad_per_mille {
            let bad = self.malformed();
            self.queue.push_back(bad);
        }
    }
}

impl Iterator for Generator {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        if self.queue.is_empty() {
            self.enqueue_send();
        }
        self.queue.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_the_documented_business_id_shape() {
        let id = Generator::business_id(2, 1_700_450_000_123);
        assert_eq!(id, 3000010220231120);
        assert_eq!(id.to_string().len(), 16);
    }

    #[test]
    fn is_deterministic_and_mixes_good_and_bad() {
        let config = GeneratorConfig {
            bad_per_mille: 200,
            max_ids: 10,
            ..Default::default()
        };
        let a: Vec<_> = Generator::new(config.clone())
            .take(2000)
            .map(|g| g.value)
            .collect();
        let b: Vec<_> = Generator::new(config.clone())
            .take(2000)
            .map(|g| g.value)
            .collect();
        assert_eq!(a, b);
        let kinds: std::collections::BTreeSet<_> = Generator::new(config)
            .take(5000)
            .filter_map(|g| g.bad)
            .collect();
        assert_eq!(kinds.len(), 7, "{kinds:?}");
    }

    /// Batch sends on either key distribution: about a tenth of the good events carry
    /// 2–19 receivers, the rest one, and none more.
    #[test]
    fn batch_sends_give_a_tenth_of_the_events_many_receivers() {
        for shape in [
            Shape::Funnel,
            Shape::RedisHeavy {
                receivers: 1_000_000,
            },
        ] {
            let config = GeneratorConfig {
                shape,
                batch_sends: true,
                bad_per_mille: 0,
                ..Default::default()
            };
            let mut fan_outs = [0usize; 21];
            for generated in Generator::new(config).take(20_000) {
                let value: serde_json::Value =
                    serde_json::from_slice(&generated.value.expect("a value")).expect("json");
                let ids = value["ids"].as_array().map_or(0, Vec::len);
                fan_outs[ids.min(20)] += 1;
            }
            let many: usize = fan_outs[2..=19].iter().sum();
            assert_eq!(
                (fan_outs[0], fan_outs[20]),
                (0, 0),
                "{shape:?}: {fan_outs:?}"
            );
            assert!(
                (1_600..=2_400).contains(&many) && fan_outs[19] > 0,
                "{shape:?}: {many} of 20000 with 2–19 receivers: {fan_outs:?}"
            );
        }
    }
}

//! Wildcard topic subscriptions with RabbitMQ topic-exchange semantics.
//!
//! Topic names are already dot-separated words by convention (`order.eu.electronics`), so a
//! pattern is written in the same vocabulary: `*` stands for exactly one word and `#` for zero or
//! more words. We follow RabbitMQ rather than inventing a syntax (or using regexes, as Kafka's
//! `subscribe(Pattern)` does) because its semantics are widely known, cannot express anything
//! expensive to evaluate, and keep patterns readable next to the topic names they select.
//!
//! Rules, and the reasons for them:
//!
//! - Wildcards must be whole words (`or*der` is rejected). A partial-word wildcard would look like
//!   a glob but silently mean something else, so it is an error rather than a literal.
//! - Literal words use the topic-name alphabet (see `names.rs`) minus `.`, and empty words
//!   (`a..b`, `.a`, `a.`) are rejected: such a pattern is almost certainly a typo, and forbidding
//!   it keeps `parse(p.to_string()) == p` trivially true.
//! - A pattern is at most [`MAX_TOPIC_NAME_LEN`] bytes long: a literal pattern is then always a
//!   valid topic name, and nothing longer is needed to select topics bounded by that limit.
//! - Topic *names*, unlike patterns, may legally contain empty words (`.a` is a valid Kafka topic
//!   name). `*` matches an empty word like any other, as RabbitMQ does with routing keys, so that
//!   `#` really matches every topic. Strings that are not valid topic names match nothing: a
//!   subscription can only ever refer to topics that could exist.
//! - Internal topics (names starting with `__`, e.g. `__consumer_offsets`) are never matched by a
//!   pattern whose first word is a wildcard. They hold broker bookkeeping, not user data, and a
//!   consumer subscribed to `#` or `*.audit` must not start reading (and committing offsets for)
//!   them by accident; Kafka excludes internal topics from pattern subscriptions for the same
//!   reason. Naming them explicitly (`__consumer_offsets`, `__audit.#`) still works, because then
//!   the intent is unambiguous.
//!
//! Matching uses the classic two-pointer glob algorithm with backtracking to the most recent `#`
//! only, which is O(pattern words × topic words) in the worst case. A naive recursive matcher is
//! exponential on patterns like `#.#.#.#.x`, and patterns may come from untrusted clients.

use std::fmt;

use crate::names::{MAX_TOPIC_NAME_LEN, validate_topic_name};

/// Prefix of internal topics, which leading wildcards never match.
const INTERNAL_PREFIX: &str = "__";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("topic pattern is empty")]
    Empty,
    #[error("topic pattern is {0} bytes long; the limit is {MAX_TOPIC_NAME_LEN}")]
    TooLong(usize),
    #[error(
        "topic pattern has an empty word at byte {position} (leading, trailing or repeated '.')"
    )]
    EmptyWord { position: usize },
    #[error(
        "topic pattern word {word:?} at byte {position} mixes a wildcard with other characters; \
         '*' and '#' must be whole words"
    )]
    PartialWildcard { word: String, position: usize },
    #[error(
        "topic pattern word {word:?} at byte {position} contains {found:?}; words may only use \
         ASCII letters, digits, '_' and '-', or be exactly '*' or '#'"
    )]
    IllegalChar {
        word: String,
        position: usize,
        found: char,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Word {
    Literal(String),
    /// `*`: exactly one word.
    One,
    /// `#`: zero or more words.
    Any,
}

/// A parsed, validated topic pattern. See the module docs for the syntax.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicPattern {
    source: String,
    words: Vec<Word>,
}

impl TopicPattern {
    pub fn parse(pattern: &str) -> Result<TopicPattern, PatternError> {
        if pattern.is_empty() {
            return Err(PatternError::Empty);
        }
        if pattern.len() > MAX_TOPIC_NAME_LEN {
            return Err(PatternError::TooLong(pattern.len()));
        }
        let mut words = Vec::new();
        let mut position = 0;
        for word in pattern.split('.') {
            words.push(parse_word(word, position)?);
            position += word.len() + 1;
        }
        Ok(TopicPattern {
            source: pattern.to_owned(),
            words,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True if the pattern has no wildcards, i.e. it matches exactly one topic: itself.
    pub fn is_literal(&self) -> bool {
        self.words.iter().all(|w| matches!(w, Word::Literal(_)))
    }

    /// Whether `topic` is selected by this pattern. Never panics; strings that are not valid
    /// topic names never match.
    pub fn matches(&self, topic: &str) -> bool {
        if validate_topic_name(topic).is_err() {
            return false;
        }
        let leading_wildcard = !matches!(self.words.first(), Some(Word::Literal(_)));
        if leading_wildcard && topic.starts_with(INTERNAL_PREFIX) {
            return false;
        }
        // A valid topic name is at most MAX_TOPIC_NAME_LEN bytes, so this is small.
        let topic_words: Vec<&str> = topic.split('.').collect();
        match_words(&self.words, &topic_words)
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn parse_word(word: &str, position: usize) -> Result<Word, PatternError> {
    match word {
        "" => return Err(PatternError::EmptyWord { position }),
        "*" => return Ok(Word::One),
        "#" => return Ok(Word::Any),
        _ => {}
    }
    let bad = word
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    match bad {
        None => Ok(Word::Literal(word.to_owned())),
        Some('*' | '#') => Err(PatternError::PartialWildcard {
            word: word.to_owned(),
            position,
        }),
        Some(found) => Err(PatternError::IllegalChar {
            word: word.to_owned(),
            position,
            found,
        }),
    }
}

/// Glob matching over words, where `Any` plays the role of glob `*` and `One` of glob `?`.
///
/// On a mismatch we only ever retry from the most recent `Any`, letting it swallow one more
/// word. Retrying earlier `Any`s is never needed: whatever they could absorb, the latest one can
/// absorb too, since everything between them already matched. Each retry advances the topic
/// start position, so the total work is O(pattern.len() * topic.len()).
fn match_words(pattern: &[Word], topic: &[&str]) -> bool {
    let (mut p, mut t) = (0, 0);
    // (pattern index just after the latest `Any`, topic index where its match would resume)
    let mut retry: Option<(usize, usize)> = None;
    while t < topic.len() {
        match pattern.get(p) {
            Some(Word::Any) => {
                p += 1;
                retry = Some((p, t));
                continue;
            }
            Some(Word::One) => {
                p += 1;
                t += 1;
                continue;
            }
            Some(Word::Literal(lit)) if lit == topic[t] => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        match retry {
            Some((rp, rt)) => {
                p = rp;
                t = rt + 1;
                retry = Some((rp, rt + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|w| *w == Word::Any)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pat(p: &str) -> TopicPattern {
        match TopicPattern::parse(p) {
            Ok(p) => p,
            Err(e) => panic!("{p:?} should parse: {e}"),
        }
    }

    #[track_caller]
    fn check(p: &str, yes: &[&str], no: &[&str]) {
        let parsed = pat(p);
        for t in yes {
            assert!(parsed.matches(t), "{p:?} should match {t:?}");
        }
        for t in no {
            assert!(!parsed.matches(t), "{p:?} should not match {t:?}");
        }
    }

    #[test]
    fn examples() {
        check(
            "order.*.electronics",
            &["order.eu.electronics", "order..electronics"],
            &[
                "order.electronics",
                "order.eu.x.electronics",
                "order.eu.electronic",
            ],
        );
        check(
            "order.#",
            &["order", "order.eu", "order.eu.electronics"],
            &["orders", "orders.eu", "x.order"],
        );
        check(
            "#",
            &["a", "order.eu", "x.y.z.w", ".a", "a.", "a..b"],
            &["", ".", "..", "a b"],
        );
        check(
            "#.audit",
            &["audit", "x.y.audit", "x.audit"],
            &["audit.x", "xaudit", "x.audits"],
        );
        check(
            "a.#.b",
            &["a.b", "a.x.b", "a.x.y.b", "a.b.b", "a.b.x.b"],
            &["a", "b", "a.x", "x.b", "a.b.x", "ab"],
        );
        check("*", &["a", "orders"], &["a.b", "a.b.c"]);
        check("*.*", &["a.b", ".a", "a."], &["a", "a.b.c"]);
        check("#.*", &["a", "a.b"], &[]);
        check("*.#", &["a", "a.b", "a.b.c"], &[]);
        check("#.#", &["a", "a.b"], &[]);
        check("a.*.#.c", &["a.b.c", "a.b.x.y.c"], &["a.c", "a.b"]);
    }

    #[test]
    fn internal_topics_need_a_literal_first_word() {
        let internal = "__consumer_offsets";
        for p in ["#", "*", "#.__consumer_offsets", "*.#"] {
            assert!(!pat(p).matches(internal), "{p}");
        }
        check("#", &["_single", "a.__x"], &["__x.y", "__"]);
        check("__consumer_offsets", &[internal], &[]);
        check("__consumer_offsets.#", &[internal], &[]);
        check("__audit.*", &["__audit.x"], &["__audit"]);
        check("#.audit", &["x.audit"], &["__x.audit"]);
    }

    #[test]
    fn accessors() {
        let p = pat("order.*.electronics");
        assert_eq!(p.as_str(), "order.*.electronics");
        assert_eq!(p.to_string(), "order.*.electronics");
        assert!(!p.is_literal());
        assert!(!pat("a.#").is_literal());
        assert!(pat("a.b-c_9").is_literal());
        check("a.b-c_9", &["a.b-c_9"], &["a.b-c_", "a.b-c_9.x", "a"]);
    }

    #[test]
    fn invalid_patterns() {
        use PatternError::*;
        let cases: &[(&str, PatternError)] = &[
            ("", Empty),
            (".", EmptyWord { position: 0 }),
            ("..", EmptyWord { position: 0 }),
            (".a", EmptyWord { position: 0 }),
            ("a.", EmptyWord { position: 2 }),
            ("a..b", EmptyWord { position: 2 }),
            ("a.#.", EmptyWord { position: 4 }),
            (
                "or*der",
                PartialWildcard {
                    word: "or*der".into(),
                    position: 0,
                },
            ),
            (
                "a.#b",
                PartialWildcard {
                    word: "#b".into(),
                    position: 2,
                },
            ),
            (
                "a.**",
                PartialWildcard {
                    word: "**".into(),
                    position: 2,
                },
            ),
            (
                "a.b c",
                IllegalChar {
                    word: "b c".into(),
                    position: 2,
                    found: ' ',
                },
            ),
            (
                "naïve.x",
                IllegalChar {
                    word: "naïve".into(),
                    position: 0,
                    found: 'ï',
                },
            ),
            (
                "é.a/b",
                IllegalChar {
                    word: "é".into(),
                    position: 0,
                    found: 'é',
                },
            ),
            (
                "ab.a/b",
                IllegalChar {
                    word: "a/b".into(),
                    position: 3,
                    found: '/',
                },
            ),
        ];
        for (p, want) in cases {
            assert_eq!(TopicPattern::parse(p).as_ref(), Err(want), "{p:?}");
        }
        let long = "x".repeat(MAX_TOPIC_NAME_LEN + 1);
        assert_eq!(
            TopicPattern::parse(&long),
            Err(TooLong(MAX_TOPIC_NAME_LEN + 1))
        );
        assert!(TopicPattern::parse(&"x".repeat(MAX_TOPIC_NAME_LEN)).is_ok());
        let msg = TopicPattern::parse("a.or*der")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("\"or*der\"") && msg.contains("byte 2"),
            "{msg}"
        );
    }

    #[test]
    fn no_exponential_blowup() {
        let p = pat(&format!("{}.x", ["#"; 60].join(".")));
        let topic = ["a"; 120].join(".");
        assert!(!p.matches(&topic));
        assert!(p.matches(&format!("{topic}.x")));
        let p = pat("#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.x");
        assert!(!p.matches(&topic));
    }

    /// Obviously-correct exponential matcher, straight from the definition.
    fn reference(pattern: &str, topic: &str) -> bool {
        fn rec(p: &[&str], t: &[&str]) -> bool {
            match p.split_first() {
                None => t.is_empty(),
                Some((&"#", rest)) => (0..=t.len()).any(|n| rec(rest, &t[n..])),
                Some((&"*", rest)) => !t.is_empty() && rec(rest, &t[1..]),
                Some((lit, rest)) => t.first() == Some(lit) && rec(rest, &t[1..]),
            }
        }
        let p: Vec<&str> = pattern.split('.').collect();
        let t: Vec<&str> = topic.split('.').collect();
        let leading_wildcard = p[0] == "*" || p[0] == "#";
        validate_topic_name(topic).is_ok()
            && !(leading_wildcard && topic.starts_with("__"))
            && rec(&p, &t)
    }

    fn words(alphabet: &'static [&'static str], max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(alphabet), 1..=max)
            .prop_map(|w| w.join("."))
    }

    const PATTERN_WORDS: &[&str] = &["a", "b", "ab", "__a", "*", "#"];
    const TOPIC_WORDS: &[&str] = &["a", "b", "ab", "__a", ""];

    proptest! {
        #[test]
        fn agrees_with_reference(p in words(PATTERN_WORDS, 6), t in words(TOPIC_WORDS, 7)) {
            let parsed = pat(&p);
            prop_assert_eq!(parsed.matches(&t), reference(&p, &t), "{} vs {}", p, t);
        }

        #[test]
        fn display_round_trips(p in words(PATTERN_WORDS, 10)) {
            let parsed = pat(&p);
            prop_assert_eq!(TopicPattern::parse(&parsed.to_string()), Ok(parsed));
        }

        #[test]
        fn never_panics(s in ".{0,300}", t in ".{0,300}") {
            if let Ok(p) = TopicPattern::parse(&s) {
                let _ = p.matches(&t);
                let _ = p.matches(&s);
            }
        }

        #[test]
        fn never_panics_near_valid(s in "[ab*#._ -]{0,40}", t in "[ab._]{0,40}") {
            if let Ok(p) = TopicPattern::parse(&s) {
                prop_assert_eq!(p.matches(&t), reference(&s, &t));
            }
        }

        #[test]
        fn literal_matches_only_itself(
            p in "[a-zA-Z0-9_-]{1,8}(\\.[a-zA-Z0-9_-]{1,8}){0,4}",
            t in "[a-zA-Z0-9_.-]{0,20}",
        ) {
            let parsed = pat(&p);
            prop_assert!(parsed.is_literal());
            prop_assert!(parsed.matches(&p));
            prop_assert_eq!(parsed.matches(&t), t == p);
        }
    }
}

//! Topic matching: a trie over the words of binding keys.
//!
//! Grammar (RabbitMQ's, [`Syntax::Amqp`]): a routing key is words separated by
//! `.`; in a binding key `*` matches exactly one word and `#` matches zero or more
//! words. The empty key has zero words. [`Syntax::Mqtt`] is the same trie over
//! MQTT topic levels: `/` separates, `+` is one level, `#` zero or more (so `a/#`
//! also takes `a`, as MQTT says). Matching walks the trie once per publish, so its cost depends on
//! the key's length and the patterns that can match, not on how many bindings exist
//! (100k bindings stay fast). A `#` node may be entered at many word positions; the
//! walk remembers (node, position) pairs it has visited so that hostile patterns such
//! as `#.#.#.#` cannot make matching exponential.

use std::collections::{HashMap, HashSet};

/// A trie of binding keys whose leaves hold values of type `T`.
#[derive(Debug)]
pub struct TopicTrie<T> {
    root: Node<T>,
    len: usize,
    syntax: Syntax,
}

/// Which topic grammar a trie speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Syntax {
    /// RabbitMQ's binding keys: `.` between words, `*` one word, `#` any.
    #[default]
    Amqp,
    /// MQTT topic filters: `/` between levels, `+` one level, `#` any.
    Mqtt,
}

impl Syntax {
    fn separator(self) -> char {
        match self {
            Syntax::Amqp => '.',
            Syntax::Mqtt => '/',
        }
    }

    fn one(self) -> &'static str {
        match self {
            Syntax::Amqp => "*",
            Syntax::Mqtt => "+",
        }
    }

    /// The words of `key`; the empty key has none.
    fn words(self, key: &str) -> impl Iterator<Item = &str> {
        let mut it = (!key.is_empty()).then(|| key.split(self.separator()));
        std::iter::from_fn(move || it.as_mut().and_then(Iterator::next))
    }
}

#[derive(Debug)]
struct Node<T> {
    words: HashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    hash: Option<Box<Node<T>>>,
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            words: HashMap::new(),
            star: None,
            hash: None,
            values: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }
}

/// Splits a routing key into words; the empty key has none.
pub fn words(key: &str) -> impl Iterator<Item = &str> {
    Syntax::Amqp.words(key)
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie::with_syntax(Syntax::Amqp)
    }
}

impl<T> TopicTrie<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_syntax(syntax: Syntax) -> Self {
        TopicTrie {
            root: Node::default(),
            len: 0,
            syntax,
        }
    }

    /// How many values the trie holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `value` under the binding key `pattern`.
    pub fn insert(&mut self, pattern: &str, value: T) {
        let mut node = &mut self.root;
        let one = self.syntax.one();
        for word in self.syntax.words(pattern) {
            node = match word {
                "#" => node.hash.get_or_insert_with(Box::default),
                w if w == one => node.star.get_or_insert_with(Box::default),
                w => node.words.entry(w.into()).or_default(),
            };
        }
        node.values.push(value);
        self.len += 1;
    }

    /// Removes the first value under `pattern` for which `is_it` holds; prunes
    /// nodes left empty. Returns the removed value.
    pub fn remove(&mut self, pattern: &str, is_it: impl Fn(&T) -> bool) -> Option<T> {
        let parts: Vec<&str> = self.syntax.words(pattern).collect();
        let removed = remove_at(&mut self.root, &parts, self.syntax.one(), &is_it);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Calls `found` for every value whose pattern matches `key`. A value may be
    /// reported more than once when several paths match; callers deduplicate.
    pub fn matches<'a>(&'a self, key: &str, mut found: impl FnMut(&'a T)) {
        let parts: Vec<&str> = self.syntax.words(key).collect();
        let mut seen = HashSet::new();
        walk(&self.root, &parts, 0, &mut seen, &mut found);
    }
}

/// Removes under `parts` (a pattern's words; `one` is the syntax's one-word
/// wildcard, `#` the many-words one).
fn remove_at<T>(
    node: &mut Node<T>,
    parts: &[&str],
    one: &str,
    is_it: &impl Fn(&T) -> bool,
) -> Option<T> {
    let Some((first, rest)) = parts.split_first() else {
        let pos = node.values.iter().position(is_it)?;
        return Some(node.values.remove(pos));
    };
    let (removed, now_empty) = match *first {
        "#" => {
            let child = node.hash.as_deref_mut()?;
            let r = remove_at(child, rest, one, is_it);
            (r, child.is_empty())
        }
        w if w == one => {
            let child = node.star.as_deref_mut()?;
            let r = remove_at(child, rest, one, is_it);
            (r, child.is_empty())
        }
        w => {
            let child = node.words.get_mut(w)?;
            let r = remove_at(child, rest, one, is_it);
            (r, child.is_empty())
        }
    };
    if now_empty {
        match *first {
            "#" => node.hash = None,
            w if w == one => node.star = None,
            w => {
                node.words.remove(w);
            }
        }
    }
    removed
}

fn walk<'a, T>(
    node: &'a Node<T>,
    parts: &[&str],
    pos: usize,
    seen: &mut HashSet<(usize, usize)>,
    found: &mut impl FnMut(&'a T),
) {
    if let Some(hash) = node.hash.as_deref() {
        // `#` swallows zero or more words: continue from every later position.
        for next in pos..=parts.len() {
            if seen.insert((std::ptr::from_ref(hash) as usize, next)) {
                walk(hash, parts, next, seen, found);
            }
        }
    }
    let Some(word) = parts.get(pos) else {
        node.values.iter().for_each(&mut *found);
        return;
    };
    if let Some(child) = node.words.get(*word) {
        walk(child, parts, pos + 1, seen, found);
    }
    if let Some(star) = node.star.as_deref() {
        walk(star, parts, pos + 1, seen, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matching(patterns: &[&str], key: &str) -> Vec<String> {
        let mut trie = TopicTrie::new();
        for p in patterns {
            trie.insert(p, p.to_string());
        }
        let mut out = Vec::new();
        trie.matches(key, |v: &String| out.push(v.clone()));
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn rabbitmq_topic_semantics() {
        let pats = ["a.b.c", "a.*.c", "a.#", "#", "*", "a.#.c", "#.c", "*.*", ""];
        assert_eq!(
            matching(&pats, "a.b.c"),
            ["#", "#.c", "a.#", "a.#.c", "a.*.c", "a.b.c"]
        );
        assert_eq!(matching(&pats, "a"), ["#", "*", "a.#"]);
        assert_eq!(matching(&pats, ""), ["", "#"]);
        assert_eq!(matching(&pats, "a.c"), ["#", "#.c", "*.*", "a.#", "a.#.c"]);
        assert_eq!(matching(&pats, "x.y"), ["#", "*.*"]);
        assert_eq!(matching(&["a.*"], "a"), Vec::<String>::new());
        assert_eq!(matching(&["a..b"], "a..b"), ["a..b"]);
    }

    #[test]
    fn remove_prunes_and_keeps_others() {
        let mut trie = TopicTrie::new();
        trie.insert("a.*.c", 1);
        trie.insert("a.*.c", 2);
        trie.insert("a.#", 3);
        assert_eq!(trie.remove("a.*.c", |v| *v == 1), Some(1));
        assert_eq!(trie.remove("a.*.c", |v| *v == 1), None);
        assert_eq!(trie.len(), 2);
        let mut got = vec![];
        trie.matches("a.b.c", |v| got.push(*v));
        got.sort();
        assert_eq!(got, [2, 3]);
        trie.remove("a.*.c", |v| *v == 2);
        trie.remove("a.#", |v| *v == 3);
        assert!(trie.root.is_empty());
    }

    #[test]
    fn mqtt_syntax_levels_and_wildcards() {
        let mut trie = TopicTrie::with_syntax(Syntax::Mqtt);
        for p in [
            "plant/v1.2/+",
            "plant/+/temp.celsius",
            "a/#",
            "a.b/c",
            "x/*/y",
            "#",
        ] {
            trie.insert(p, p.to_owned());
        }
        fn got(trie: &TopicTrie<String>, t: &str) -> Vec<String> {
            let mut out = vec![];
            trie.matches(t, |v: &String| out.push(v.clone()));
            out.sort();
            out.dedup();
            out
        }
        assert_eq!(
            got(&trie, "plant/v1.2/temp.celsius"),
            ["#", "plant/+/temp.celsius", "plant/v1.2/+"]
        );
        assert_eq!(got(&trie, "a"), ["#", "a/#"]);
        assert_eq!(got(&trie, "a.b/c"), ["#", "a.b/c"]);
        assert_eq!(got(&trie, "a/b/c"), ["#", "a/#"]);
        // `*` is an ordinary character in MQTT.
        assert_eq!(got(&trie, "x/*/y"), ["#", "x/*/y"]);
        assert_eq!(got(&trie, "x/z/y"), ["#"]);
        assert_eq!(
            trie.remove("x/*/y", |v| v == "x/*/y").as_deref(),
            Some("x/*/y")
        );
        assert_eq!(
            trie.remove("plant/v1.2/+", |_| true).as_deref(),
            Some("plant/v1.2/+")
        );
        assert_eq!(got(&trie, "x/*/y"), ["#"]);
        assert_eq!(got(&trie, "plant/v1.2/t"), ["#"]);
    }

    #[test]
    fn hostile_hash_patterns_stay_polynomial() {
        let mut trie = TopicTrie::new();
        trie.insert("#.#.#.#.#.#.#.#.#.#.#.#.x", 1);
        let key = vec!["w"; 200].join(".");
        let mut hits = 0;
        trie.matches(&key, |_| hits += 1);
        assert_eq!(hits, 0);
    }
}

//! The intent model: learned at load time from each intent's examples and
//! keywords, in pure Rust and without any download.
//!
//! A text becomes a sparse TF-IDF vector of its words, its word pairs and
//! the character 3- to 5-grams of its words (which carry typos and word
//! forms: "recomend" shares most of its grams with "recommend"), over text
//! normalised for case, accents and apostrophes. A softmax regression over
//! those vectors, trained by stochastic gradient descent in a fixed order
//! (the same project always gives the same model), gives each intent a
//! probability. The confidence is the best intent's probability, damped
//! when the text is far from every example (its best similarity, the cosine
//! with an intent's nearest example and centroid, below
//! `KNOWN_SIMILARITY`), so a text like nothing the model learned gets a low
//! one and the fallback intent runs.

use std::collections::HashMap;

use crate::project::IntentId;

/// Weight of the nearest example in an intent's similarity; the rest is
/// the centroid's.
const NEAREST_WEIGHT: f32 = 0.6;

/// A text whose similarity with every intent is below this has its
/// confidence scaled down in proportion.
const KNOWN_SIMILARITY: f32 = 0.15;

/// Passes over the examples.
const EPOCHS: usize = 15;

/// The regression's first learning rate (it decays by a tenth each epoch)
/// and its L2 penalty.
const LEARNING_RATE: f32 = 4.0;
const L2: f32 = 1e-4;

/// A feature found in more than this share of the examples, or in the
/// examples of more than this share of the intents, is left out, in a
/// project with at least `MAX_DF_MIN_INTENTS` intents with examples.
const MAX_DOCUMENT_FREQUENCY: f32 = 0.5;
const MAX_INTENT_FREQUENCY: f32 = 0.9;
const MAX_DF_MIN_INTENTS: usize = 4;

/// Weights of the feature groups.
const WORD_WEIGHT: f32 = 1.0;
const PAIR_WEIGHT: f32 = 0.8;
const GRAM_WEIGHT: f32 = 0.35;

/// A sparse vector: feature ids in increasing order with their weights,
/// L2-normalised.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sparse(Vec<(u32, f32)>);

impl Sparse {
    fn normalised(mut entries: Vec<(u32, f32)>) -> Sparse {
        entries.sort_unstable_by_key(|(id, _)| *id);
        let norm = entries.iter().map(|(_, w)| w * w).sum::<f32>().sqrt();
        if norm > 0.0 {
            for (_, weight) in &mut entries {
                *weight /= norm;
            }
        }
        Sparse(entries)
    }
}

/// The trained model of a project's intents. `Debug` shows its sizes.
///
/// Per feature, the model keeps an entry for each intent whose examples
/// have that feature (its regression weight and its centroid's weight), and
/// nothing for the others: the model grows with the examples, not with
/// features × intents, and scoring a text reads one short run per feature.
#[derive(Default)]
pub struct IntentModel {
    /// Feature hash → id.
    vocabulary: HashMap<u64, u32, FeatureHashing>,
    /// Inverse document frequency, by feature id.
    idf: Vec<f32>,
    /// How many intents, and how many examples each learned from.
    examples_per_intent: Vec<u32>,
    /// The entries of feature `id` are `entries[entry_starts[id]..
    /// entry_starts[id + 1]]`.
    entry_starts: Vec<u32>,
    entries: Vec<Entry>,
    /// The inverted index of the examples: the entries of feature `id` are
    /// `postings[posting_starts[id]..posting_starts[id + 1]]`, each an
    /// example and the feature's weight there.
    posting_starts: Vec<u32>,
    postings: Vec<(u32, f32)>,
    /// The intent of each example.
    example_intent: Vec<u32>,
    /// The softmax regression's bias per intent (its weights are in the
    /// entries).
    biases: Vec<f32>,
}

/// An intent whose examples have a feature.
#[derive(Debug, Clone, Copy)]
struct Entry {
    intent: u32,
    /// The regression's weight of the feature for the intent. An intent
    /// without the feature has none: the softmax is the same when a
    /// feature's weights all move by one constant, and training only ever
    /// lowers the others alike.
    weight: f32,
    /// The feature's weight in the intent's centroid (the normalised sum of
    /// its examples).
    centroid: f32,
}

impl std::fmt::Debug for IntentModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntentModel")
            .field("features", &self.idf.len())
            .field("intents", &self.examples_per_intent.len())
            .field("examples", &self.example_intent.len())
            .finish()
    }
}

/// What the model says of a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub intent: IntentId,
    /// 0.0 to 1.0: the softmax share of the best intent against the others
    /// and "none of them".
    pub confidence: f64,
}

impl IntentModel {
    /// The model of a project's intents, learned from their examples and
    /// keywords.
    pub fn for_intents(intents: &[crate::project::Intent]) -> IntentModel {
        let texts: Vec<Vec<String>> = intents
            .iter()
            .map(|intent| {
                intent
                    .examples
                    .iter()
                    .chain(&intent.keywords)
                    .cloned()
                    .collect()
            })
            .collect();
        IntentModel::train(&texts)
    }

    /// Trains on `examples[i]`, the texts of intent `i` (its examples and
    /// keywords).
    pub fn train(examples: &[Vec<String>]) -> IntentModel {
        let documents: Vec<Vec<Vec<(u64, f32)>>> = examples
            .iter()
            .map(|texts| texts.iter().map(|text| features(text)).collect())
            .collect();
        let mut vocabulary: HashMap<u64, u32, FeatureHashing> = HashMap::default();
        let mut document_frequency: Vec<u32> = Vec::new();
        // How many intents have the feature in an example, and the last
        // intent counted.
        let mut intent_frequency: Vec<(u32, u32)> = Vec::new();
        let mut total = 0u32;
        for (intent, intent_documents) in documents.iter().enumerate() {
            for document in intent_documents {
                total += 1;
                let mut seen = std::collections::HashSet::new();
                for (feature, _) in document {
                    let next = vocabulary.len() as u32;
                    let id = *vocabulary.entry(*feature).or_insert(next);
                    if id as usize == document_frequency.len() {
                        document_frequency.push(0);
                        intent_frequency.push((0, u32::MAX));
                    }
                    if seen.insert(id) {
                        document_frequency[id as usize] += 1;
                        let counted = &mut intent_frequency[id as usize];
                        if counted.1 != intent as u32 {
                            *counted = (counted.0 + 1, intent as u32);
                        }
                    }
                }
            }
        }
        // A feature in most examples, or in the examples of most intents
        // ("the", "me"), tells the intents apart little and would give every
        // intent an entry (training time grows with the entries): with
        // enough intents for that to be true of it, it is left out.
        let intents_with_examples = examples.iter().filter(|texts| !texts.is_empty()).count();
        if intents_with_examples >= MAX_DF_MIN_INTENTS {
            let limit = (total as f32 * MAX_DOCUMENT_FREQUENCY) as u32;
            let intent_limit = (intents_with_examples as f32 * MAX_INTENT_FREQUENCY) as u32;
            vocabulary.retain(|_, id| {
                document_frequency[*id as usize] <= limit
                    && intent_frequency[*id as usize].0 <= intent_limit
            });
        }
        let idf: Vec<f32> = document_frequency
            .iter()
            .map(|df| ((1.0 + total as f32) / (1.0 + *df as f32)).ln() + 1.0)
            .collect();
        let classes = documents.len();
        let mut model = IntentModel {
            vocabulary,
            idf,
            entry_starts: Vec::new(),
            entries: Vec::new(),
            examples_per_intent: Vec::new(),
            posting_starts: Vec::new(),
            postings: Vec::new(),
            example_intent: Vec::new(),
            biases: Vec::new(),
        };
        let vectors: Vec<Vec<Sparse>> = documents
            .iter()
            .map(|intent_documents| {
                intent_documents
                    .iter()
                    .map(|document| model.vector(document))
                    .filter(|vector| !vector.0.is_empty())
                    .collect()
            })
            .collect();
        let mut lists: Vec<Vec<Entry>> = vec![Vec::new(); model.idf.len()];
        for (intent, examples) in vectors.iter().enumerate() {
            let mut sum: HashMap<u32, f32> = HashMap::new();
            for example in examples {
                for (id, weight) in &example.0 {
                    *sum.entry(*id).or_insert(0.0) += weight;
                }
            }
            for (id, centroid) in Sparse::normalised(sum.into_iter().collect()).0 {
                lists[id as usize].push(Entry {
                    intent: intent as u32,
                    weight: 0.0,
                    centroid,
                });
            }
            model.examples_per_intent.push(examples.len() as u32);
        }
        debug_assert_eq!(classes, model.examples_per_intent.len());
        model.entry_starts = Vec::with_capacity(lists.len() + 1);
        for list in lists {
            model.entry_starts.push(model.entries.len() as u32);
            model.entries.extend(list);
        }
        model.entry_starts.push(model.entries.len() as u32);
        model.index_examples(&vectors);
        model.fit_regression(&vectors);
        model
    }

    fn classes(&self) -> usize {
        self.examples_per_intent.len()
    }

    /// The inverted index of the examples' features.
    fn index_examples(&mut self, vectors: &[Vec<Sparse>]) {
        let mut lists: Vec<Vec<(u32, f32)>> = vec![Vec::new(); self.idf.len()];
        for (intent, examples) in vectors.iter().enumerate() {
            for example in examples {
                let index = self.example_intent.len() as u32;
                self.example_intent.push(intent as u32);
                for (id, weight) in &example.0 {
                    lists[*id as usize].push((index, *weight));
                }
            }
        }
        self.posting_starts = Vec::with_capacity(lists.len() + 1);
        for list in lists {
            self.posting_starts.push(self.postings.len() as u32);
            self.postings.extend(list);
        }
        self.posting_starts.push(self.postings.len() as u32);
    }

    /// Softmax regression by stochastic gradient descent with L2, in a
    /// fixed order (training is deterministic).
    fn fit_regression(&mut self, vectors: &[Vec<Sparse>]) {
        let classes = self.classes();
        self.biases = vec![0.0; classes];
        let mut samples: Vec<(usize, &Sparse)> = Vec::new();
        for (class, examples) in vectors.iter().enumerate() {
            for example in examples {
                samples.push((class, example));
            }
        }
        if samples.is_empty() {
            return;
        }
        // Interleave the classes: a fixed order that is not sorted by class.
        samples.sort_by_key(|(class, example)| (example.0.len() * 7919 + class * 104729) % 1009);
        let mut rate = LEARNING_RATE;
        let mut logits = vec![0.0f32; classes];
        for _ in 0..EPOCHS {
            for (class, example) in &samples {
                self.logits(example, &mut logits);
                softmax(&mut logits);
                for (id, x) in &example.0 {
                    let range = self.entry_range(*id);
                    for entry in &mut self.entries[range] {
                        let k = entry.intent as usize;
                        let gradient = logits[k] - if k == *class { 1.0 } else { 0.0 };
                        entry.weight -= rate * (gradient * x + L2 * entry.weight);
                    }
                }
                for (k, (bias, p)) in self.biases.iter_mut().zip(&logits).enumerate() {
                    let gradient = p - if k == *class { 1.0 } else { 0.0 };
                    *bias -= rate * gradient * 0.1;
                }
            }
            rate *= 0.9;
        }
    }

    /// Where the entries of feature `id` are.
    fn entry_range(&self, id: u32) -> std::ops::Range<usize> {
        let id = id as usize;
        match (self.entry_starts.get(id), self.entry_starts.get(id + 1)) {
            (Some(start), Some(end)) => *start as usize..*end as usize,
            _ => 0..0,
        }
    }

    /// The regression's logits for a vector, into `logits`.
    fn logits(&self, vector: &Sparse, logits: &mut [f32]) {
        logits.copy_from_slice(&self.biases);
        for (id, x) in &vector.0 {
            for entry in &self.entries[self.entry_range(*id)] {
                if let Some(logit) = logits.get_mut(entry.intent as usize) {
                    *logit += entry.weight * x;
                }
            }
        }
    }

    fn vector(&self, document: &[(u64, f32)]) -> Sparse {
        let mut weights: Vec<(u32, f32)> = document
            .iter()
            .filter_map(|(feature, weight)| {
                let id = *self.vocabulary.get(feature)?;
                Some((id, weight * self.idf[id as usize]))
            })
            .collect();
        // A feature seen twice ("is" in "this is it") adds up.
        weights.sort_unstable_by_key(|(id, _)| *id);
        weights.dedup_by(|next, kept| {
            if next.0 == kept.0 {
                kept.1 += next.1;
                true
            } else {
                false
            }
        });
        Sparse::normalised(weights)
    }

    /// How like the best intent a vector is: per intent, the cosine with
    /// its nearest example blended with the cosine with its centroid, and
    /// the best of those. Weights are never negative, so the centroid's
    /// share alone is a lower bound: when it reaches `enough`, the scan of
    /// the examples (through the inverted index) is skipped.
    fn similarity(&self, vector: &Sparse, enough: f32) -> f32 {
        let classes = self.classes();
        let mut centroid = vec![0.0f32; classes];
        for (id, weight) in &vector.0 {
            for entry in &self.entries[self.entry_range(*id)] {
                if let Some(sum) = centroid.get_mut(entry.intent as usize) {
                    *sum += weight * entry.centroid;
                }
            }
        }
        let floor = centroid.iter().copied().fold(0.0f32, f32::max) * (1.0 - NEAREST_WEIGHT);
        if floor >= enough {
            return floor;
        }
        let mut dots = vec![0.0f32; self.example_intent.len()];
        for (id, weight) in &vector.0 {
            let id = *id as usize;
            let (Some(start), Some(end)) =
                (self.posting_starts.get(id), self.posting_starts.get(id + 1))
            else {
                continue;
            };
            for (example, example_weight) in &self.postings[*start as usize..*end as usize] {
                dots[*example as usize] += weight * example_weight;
            }
        }
        let mut nearest = vec![0.0f32; classes];
        for (dot, intent) in dots.iter().zip(&self.example_intent) {
            let best = &mut nearest[*intent as usize];
            *best = best.max(*dot);
        }
        nearest
            .iter()
            .zip(&centroid)
            .map(|(nearest, centroid)| NEAREST_WEIGHT * nearest + (1.0 - NEAREST_WEIGHT) * centroid)
            .fold(0.0f32, f32::max)
    }

    /// The most likely intent of `text`, or `None` when the model has no
    /// example at all or the text has no known feature.
    pub fn predict(&self, text: &str) -> Option<Prediction> {
        self.predict_unless(text, |_, _| false)
    }

    /// The prediction for `text` when it would overrule a keyword of
    /// `intent`: another intent, with a confidence of at least `threshold`.
    /// Skips the similarity scan when the regression alone rules that out
    /// (damping only lowers a confidence), which is most turns.
    pub fn overruling(&self, text: &str, intent: IntentId, threshold: f64) -> Option<Prediction> {
        self.predict_unless(text, |best, probability| {
            best == intent || f64::from(probability) < threshold
        })
        .filter(|prediction| prediction.intent != intent && prediction.confidence >= threshold)
    }

    /// `predict`, giving up (`None`) as soon as `give_up(best intent, its
    /// probability)` says the rest is not needed.
    fn predict_unless(
        &self,
        text: &str,
        give_up: impl Fn(IntentId, f32) -> bool,
    ) -> Option<Prediction> {
        let vector = self.vector(&features(text));
        if vector.0.is_empty() || self.entries.is_empty() {
            return None;
        }
        let mut probabilities = vec![0.0f32; self.classes()];
        self.logits(&vector, &mut probabilities);
        softmax(&mut probabilities);
        // The first of the most likely, as ties go to the intent declared
        // first.
        let mut best: Option<(usize, f32)> = None;
        for (index, probability) in probabilities.iter().copied().enumerate() {
            if best.is_none_or(|(_, top)| probability > top) {
                best = Some((index, probability));
            }
        }
        let (best, probability) = best?;
        if give_up(IntentId(best as u32), probability) {
            return None;
        }
        // The regression spreads its belief over the intents it knows; a
        // text like none of the examples must not borrow it.
        let known = (self.similarity(&vector, KNOWN_SIMILARITY) / KNOWN_SIMILARITY).min(1.0);
        Some(Prediction {
            intent: IntentId(best as u32),
            confidence: f64::from(probability * known),
        })
    }
}

/// Calls `visit` with each word of `text` lower-cased, with accents,
/// apostrophes and punctuation taken out ("Where’s my CAFÉ?" gives
/// `wheres`, `my`, `cafe`), padded with a space on each side (the n-grams
/// mark where a word starts and ends). One buffer serves every word.
fn for_each_word(text: &str, mut visit: impl FnMut(&[char])) {
    let mut word: Vec<char> = Vec::with_capacity(24);
    word.push(' ');
    let mut end_word = |word: &mut Vec<char>| {
        if word.len() > 1 {
            word.push(' ');
            visit(word);
            word.truncate(1);
        }
    };
    for character in text.chars() {
        if character.is_ascii() {
            if character.is_ascii_alphanumeric() {
                word.push(character.to_ascii_lowercase());
            } else if character != '\'' && character != '`' {
                end_word(&mut word);
            }
            continue;
        }
        for lower in character.to_lowercase() {
            if lower == '’' {
                continue;
            }
            if lower.is_alphanumeric() {
                word.push(fold_accent(lower));
            } else {
                end_word(&mut word);
            }
        }
    }
    end_word(&mut word);
}

/// The plain letter of a Latin letter with an accent.
fn fold_accent(character: char) -> char {
    match character {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' => 'a',
        'ç' | 'ć' | 'č' => 'c',
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ę' => 'e',
        'ì' | 'í' | 'î' | 'ï' | 'ī' => 'i',
        'ñ' | 'ń' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' => 'o',
        'ù' | 'ú' | 'û' | 'ü' | 'ū' => 'u',
        'ý' | 'ÿ' => 'y',
        'ß' => 's',
        other => other,
    }
}

/// The weighted features of a text: its words, its word pairs and the
/// character 3- to 5-grams of each word within spaces, each as a 64-bit
/// hash of its kind and text (no string is built per feature).
fn features(text: &str) -> Vec<(u64, f32)> {
    let mut features = Vec::with_capacity(64);
    let mut previous: Vec<char> = Vec::with_capacity(24);
    for_each_word(text, |padded| {
        let word = &padded[1..padded.len() - 1];
        features.push((feature_hash(b'w', word.iter().copied()), WORD_WEIGHT));
        // The 3-, 4- and 5-grams starting at each character, hashed in one
        // pass: a gram's hash continues its prefix's.
        for start in 0..padded.len() {
            let mut hash = feature_hash(b'g', std::iter::empty());
            for (length, character) in padded[start..].iter().take(5).enumerate() {
                hash = hash_character(hash, *character);
                if length >= 2 {
                    features.push((hash, GRAM_WEIGHT));
                }
            }
        }
        if !previous.is_empty() {
            let pair = previous
                .iter()
                .copied()
                .chain(std::iter::once(' '))
                .chain(word.iter().copied());
            features.push((feature_hash(b'p', pair), PAIR_WEIGHT));
        }
        previous.clear();
        previous.extend_from_slice(word);
    });
    features
}

/// Keys of the vocabulary are FNV hashes already: a finalising mix (from
/// MurmurHash3) spreads them over a table's low bits, with no SipHash.
type FeatureHashing = std::hash::BuildHasherDefault<FeatureHasher>;

#[derive(Default)]
struct FeatureHasher(u64);

impl std::hash::Hasher for FeatureHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, value: u64) {
        let mut mixed = (value ^ (value >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        mixed ^= mixed >> 33;
        self.0 = mixed;
    }
}

const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a over a kind byte and the characters of a feature.
fn feature_hash(kind: u8, characters: impl Iterator<Item = char>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    let hash = (OFFSET ^ u64::from(kind)).wrapping_mul(FNV_PRIME);
    characters.fold(hash, hash_character)
}

/// FNV-1a continued over a character's UTF-8 bytes.
fn hash_character(mut hash: u64, character: char) -> u64 {
    if character.is_ascii() {
        return (hash ^ character as u64).wrapping_mul(FNV_PRIME);
    }
    let mut buffer = [0u8; 4];
    for byte in character.encode_utf8(&mut buffer).bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
    }
    hash
}

/// Turns logits into probabilities in place.
fn softmax(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for value in values.iter_mut() {
        *value = (*value - max).exp();
        sum += *value;
    }
    if sum > 0.0 {
        for value in values.iter_mut() {
            *value /= sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> IntentModel {
        let texts = |list: &[&str]| list.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>();
        IntentModel::train(&[
            texts(&[
                "show me the menu",
                "what do you serve",
                "which desserts do you have",
            ]),
            texts(&[
                "where is my order",
                "track my delivery",
                "when will my food arrive",
            ]),
            texts(&[
                "remember that i am vegetarian",
                "i am allergic to nuts",
                "i do not eat pork",
            ]),
        ])
    }

    #[test]
    fn words_fold_case_accents_and_apostrophes() {
        let mut words = Vec::new();
        for_each_word("Where’s my CAFÉ? I'd like crème-brûlée", |padded| {
            words.push(padded.iter().collect::<String>())
        });
        assert_eq!(
            words,
            [
                " wheres ", " my ", " cafe ", " id ", " like ", " creme ", " brulee "
            ]
        );
    }

    #[test]
    fn paraphrases_and_typos_find_their_intent() {
        let model = model();
        for (text, intent) in [
            ("wheres my food", 1),
            ("can i see the menue", 0),
            ("remember i am vegan", 2),
            ("Im alergic to peanuts", 2),
        ] {
            let prediction = model.predict(text).unwrap();
            assert_eq!(
                prediction.intent,
                IntentId(intent),
                "{text}: {prediction:?}"
            );
        }
    }

    #[test]
    fn a_text_like_nothing_learned_has_a_low_confidence() {
        let model = model();
        let known = model.predict("where is my order").unwrap();
        assert!(known.confidence > 0.6, "{known:?}");
        match model.predict("the weather is nice today") {
            None => {}
            Some(unknown) => assert!(unknown.confidence < 0.5, "{unknown:?}"),
        }
        assert_eq!(model.predict("zzzz qqqq"), None);
    }
}

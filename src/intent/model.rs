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
#[derive(Default)]
pub struct IntentModel {
    /// Feature hash → id.
    vocabulary: HashMap<u64, u32, FeatureHashing>,
    /// Inverse document frequency, by feature id.
    idf: Vec<f32>,
    /// Per intent: its examples' vectors and their centroid.
    intents: Vec<Trained>,
    /// Per feature id, the examples that have it, with its weight there.
    postings: Vec<Vec<(u32, f32)>>,
    /// The intent of each example, in the order of the postings.
    example_intent: Vec<u32>,
    /// Softmax regression over the same features: per intent, a weight per
    /// feature id, and a bias.
    weights: Vec<Vec<f32>>,
    biases: Vec<f32>,
}

#[derive(Debug, Default)]
struct Trained {
    examples: Vec<Sparse>,
    /// Dense, by feature id: a text's cosine with it costs one lookup per
    /// feature of the text.
    centroid: Vec<f32>,
}

impl std::fmt::Debug for IntentModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntentModel")
            .field("features", &self.idf.len())
            .field("intents", &self.intents.len())
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
    /// The runner-up, for authoring help.
    pub second: Option<IntentId>,
}

impl IntentModel {
    /// Trains on `examples[i]`, the texts of intent `i` (its examples and
    /// keywords).
    pub fn train(examples: &[Vec<String>]) -> IntentModel {
        let documents: Vec<Vec<Vec<(u64, f32)>>> = examples
            .iter()
            .map(|texts| texts.iter().map(|text| features(text)).collect())
            .collect();
        let mut vocabulary: HashMap<u64, u32, FeatureHashing> = HashMap::default();
        let mut document_frequency: Vec<u32> = Vec::new();
        let mut total = 0u32;
        for document in documents.iter().flatten() {
            total += 1;
            let mut seen = std::collections::HashSet::new();
            for (feature, _) in document {
                let next = vocabulary.len() as u32;
                let id = *vocabulary.entry(*feature).or_insert(next);
                if id as usize == document_frequency.len() {
                    document_frequency.push(0);
                }
                if seen.insert(id) {
                    document_frequency[id as usize] += 1;
                }
            }
        }
        let idf: Vec<f32> = document_frequency
            .iter()
            .map(|df| ((1.0 + total as f32) / (1.0 + *df as f32)).ln() + 1.0)
            .collect();
        let mut model = IntentModel {
            vocabulary,
            idf,
            intents: Vec::new(),
            postings: Vec::new(),
            example_intent: Vec::new(),
            weights: Vec::new(),
            biases: Vec::new(),
        };
        for intent_documents in &documents {
            let examples: Vec<Sparse> = intent_documents
                .iter()
                .map(|document| model.vector(document))
                .filter(|vector| !vector.0.is_empty())
                .collect();
            let mut sum: HashMap<u32, f32> = HashMap::new();
            for example in &examples {
                for (id, weight) in &example.0 {
                    *sum.entry(*id).or_insert(0.0) += weight;
                }
            }
            let mut centroid = vec![0.0f32; model.idf.len()];
            for (id, weight) in Sparse::normalised(sum.into_iter().collect()).0 {
                centroid[id as usize] = weight;
            }
            model.intents.push(Trained { examples, centroid });
        }
        model.index_examples();
        model.fit_regression();
        model
    }

    /// The inverted index of the examples' features.
    fn index_examples(&mut self) {
        let mut postings: Vec<Vec<(u32, f32)>> = vec![Vec::new(); self.idf.len()];
        let mut example_intent = Vec::new();
        for (intent, trained) in self.intents.iter().enumerate() {
            for example in &trained.examples {
                let index = example_intent.len() as u32;
                example_intent.push(intent as u32);
                for (id, weight) in &example.0 {
                    postings[*id as usize].push((index, *weight));
                }
            }
        }
        self.postings = postings;
        self.example_intent = example_intent;
    }

    /// Softmax regression by stochastic gradient descent with L2, in a
    /// fixed order (training is deterministic).
    fn fit_regression(&mut self) {
        let features = self.idf.len();
        let classes = self.intents.len();
        self.weights = vec![vec![0.0; features]; classes];
        self.biases = vec![0.0; classes];
        let mut samples: Vec<(usize, &Sparse)> = Vec::new();
        for (class, intent) in self.intents.iter().enumerate() {
            for example in &intent.examples {
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
                for (k, logit) in logits.iter_mut().enumerate() {
                    *logit = self.biases[k]
                        + example
                            .0
                            .iter()
                            .map(|(id, x)| self.weights[k][*id as usize] * x)
                            .sum::<f32>();
                }
                softmax(&mut logits);
                for (k, p) in logits.iter().enumerate() {
                    let gradient = p - if k == *class { 1.0 } else { 0.0 };
                    for (id, x) in &example.0 {
                        let weight = &mut self.weights[k][*id as usize];
                        *weight -= rate * (gradient * x + L2 * *weight);
                    }
                    self.biases[k] -= rate * gradient * 0.1;
                }
            }
            rate *= 0.9;
        }
    }

    /// The regression's probability of each intent for a vector.
    fn probabilities(&self, vector: &Sparse) -> Vec<f32> {
        let mut logits: Vec<f32> = self
            .weights
            .iter()
            .zip(&self.biases)
            .map(|(weights, bias)| {
                bias + vector
                    .0
                    .iter()
                    .map(|(id, x)| weights[*id as usize] * x)
                    .sum::<f32>()
            })
            .collect();
        softmax(&mut logits);
        logits
    }

    /// Whether the model has anything to go on (some intent has examples).
    pub fn is_trained(&self) -> bool {
        self.intents
            .iter()
            .any(|intent| !intent.examples.is_empty())
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

    /// How like each intent a vector is: the cosine with its nearest
    /// example blended with the cosine with its centroid. The examples'
    /// cosines come from the inverted index, so only the examples that share
    /// a feature with the text cost anything.
    fn similarities(&self, vector: &Sparse) -> Vec<f32> {
        let mut dots = vec![0.0f32; self.example_intent.len()];
        for (id, weight) in &vector.0 {
            if let Some(postings) = self.postings.get(*id as usize) {
                for (example, example_weight) in postings {
                    dots[*example as usize] += weight * example_weight;
                }
            }
        }
        let mut nearest = vec![0.0f32; self.intents.len()];
        for (dot, intent) in dots.iter().zip(&self.example_intent) {
            let best = &mut nearest[*intent as usize];
            *best = best.max(*dot);
        }
        self.intents
            .iter()
            .zip(nearest)
            .map(|(intent, nearest)| {
                if intent.examples.is_empty() {
                    return 0.0;
                }
                let centroid: f32 = vector
                    .0
                    .iter()
                    .map(|(id, weight)| {
                        weight * intent.centroid.get(*id as usize).copied().unwrap_or(0.0)
                    })
                    .sum();
                NEAREST_WEIGHT * nearest + (1.0 - NEAREST_WEIGHT) * centroid
            })
            .collect()
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
        if vector.0.is_empty() || self.weights.is_empty() {
            return None;
        }
        let probabilities = self.probabilities(&vector);
        let mut order: Vec<usize> = (0..probabilities.len()).collect();
        order.sort_by(|a, b| {
            probabilities[*b]
                .total_cmp(&probabilities[*a])
                .then(a.cmp(b))
        });
        let best = *order.first()?;
        if give_up(IntentId(best as u32), probabilities[best]) {
            return None;
        }
        // The regression spreads its belief over the intents it knows; a
        // text like none of the examples must not borrow it.
        let nearest = self
            .similarities(&vector)
            .into_iter()
            .fold(0.0f32, f32::max);
        let known = (nearest / KNOWN_SIMILARITY).min(1.0);
        Some(Prediction {
            intent: IntentId(best as u32),
            confidence: f64::from(probabilities[best] * known),
            second: order.get(1).map(|second| IntentId(*second as u32)),
        })
    }
}

/// Lower-case words with accents, apostrophes and punctuation taken out:
/// "Where’s my CAFÉ?" is `wheres my cafe`.
pub fn words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    for character in text.chars().flat_map(char::to_lowercase) {
        if character == '\'' || character == '’' || character == '`' {
            continue;
        }
        if character.is_alphanumeric() {
            word.push(fold_accent(character));
        } else if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
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
    let words = words(text);
    let mut features = Vec::with_capacity(words.len() * 16);
    let mut padded: Vec<char> = Vec::new();
    for word in &words {
        features.push((feature_hash(b'w', word.chars()), WORD_WEIGHT));
        padded.clear();
        padded.push(' ');
        padded.extend(word.chars());
        padded.push(' ');
        for size in 3..=5 {
            for window in padded.windows(size) {
                features.push((feature_hash(b'g', window.iter().copied()), GRAM_WEIGHT));
            }
        }
    }
    for pair in words.windows(2) {
        let text = pair[0]
            .chars()
            .chain(std::iter::once(' '))
            .chain(pair[1].chars());
        features.push((feature_hash(b'p', text), PAIR_WEIGHT));
    }
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

/// FNV-1a over a kind byte and the characters of a feature.
fn feature_hash(kind: u8, characters: impl Iterator<Item = char>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut hash = (OFFSET ^ u64::from(kind)).wrapping_mul(PRIME);
    for character in characters {
        let mut buffer = [0u8; 4];
        for byte in character.encode_utf8(&mut buffer).bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
        }
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
        assert_eq!(
            words("Where’s my CAFÉ? I'd like crème-brûlée"),
            ["wheres", "my", "cafe", "id", "like", "creme", "brulee"]
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

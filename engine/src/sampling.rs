//! Choosing the next token: greedy by default; temperature, top-k and top-p sampling with
//! a seed, so that a rerun of a job reproduces its output.
//!
//! The random stream is SplitMix64, written here rather than taken from `rand`: `rand`'s
//! `StdRng` does not promise the same stream across versions, and a job rerun after an
//! upgrade must reproduce its rows.

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

impl Sampling {
    pub const fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// SplitMix64: a small, fast generator with a fixed, documented output stream.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token from `logits` (tokens with `-inf` are never picked).
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut SplitMix64) -> u32 {
    if s.is_greedy() {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    if order.is_empty() {
        return argmax(logits);
    }
    let max = logits[order[0]] as f64;
    let t = s.temperature as f64;
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / t).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= s.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let r = rng.next_f64();
    let mut acc = 0.0;
    for (k, p) in probs.iter().enumerate() {
        acc += p;
        if r < acc {
            return order[k] as u32;
        }
    }
    order[order.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_stream_is_fixed() {
        // Reference values of SplitMix64 seeded with 0.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let mut rng = SplitMix64::new(7);
        assert_eq!(pick(&logits, &Sampling::greedy(), &mut rng), 1);
        let k1 = Sampling { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 7 };
        for _ in 0..20 {
            assert_eq!(pick(&logits, &k1, &mut rng), 1);
        }
        // top_p small keeps only the best token.
        let p = Sampling { temperature: 1.0, top_k: 0, top_p: 0.1, seed: 7 };
        assert_eq!(pick(&logits, &p, &mut rng), 1);
        // Full sampling visits the other finite tokens, never the masked one, and is
        // reproducible from the seed.
        let s = Sampling { temperature: 2.0, top_k: 0, top_p: 1.0, seed: 7 };
        let draw = |seed| {
            let mut r = SplitMix64::new(seed);
            (0..200).map(|_| pick(&logits, &s, &mut r)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert!(a.contains(&0) && a.contains(&2) && !a.contains(&3));
    }
}

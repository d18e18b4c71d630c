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

/// `logits` (`[rows, vocab]`) with every token whose bit is clear in `bits` (`[rows,
/// ceil(vocab / 8)]` bytes, bit `t % 8` of byte `t / 8`) set to −∞, computed where the
/// logits are: the bitmask is one small copy, and its bits are unpacked with exact float
/// arithmetic (`floor(b / 2^k) mod 2`), since candle has no bitwise operations.
pub fn apply_bitmask(logits: &candle_core::Tensor, bits: &[u8]) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{DType, Tensor};
    let (rows, vocab) = logits.dims2()?;
    let per_row = vocab.div_ceil(8);
    if bits.len() != rows * per_row {
        candle_core::bail!("{} mask bytes for {rows} rows of {vocab} logits", bits.len());
    }
    let dev = logits.device();
    let b = Tensor::from_slice(bits, (rows, per_row, 1), dev)?.to_dtype(DType::F32)?;
    let pow = Tensor::new(&[1f32, 2., 4., 8., 16., 32., 64., 128.], dev)?.reshape((1, 1, 8))?;
    let q = b.broadcast_div(&pow)?.floor()?;
    let bit = (&q - ((&q / 2.0)?.floor()? * 2.0)?)?;
    let allowed = bit.reshape((rows, per_row * 8))?.narrow(1, 0, vocab)?;
    let neg = Tensor::full(f32::NEG_INFINITY, (rows, vocab), dev)?.to_dtype(logits.dtype())?;
    allowed.ne(0f32)?.where_cond(logits, &neg)
}

/// The index of the largest logit of every row (the first on ties), computed where the
/// logits are; one copy of `rows` ids comes back.
pub fn argmax_rows(logits: &candle_core::Tensor) -> candle_core::Result<Vec<u32>> {
    logits.argmax_keepdim(candle_core::D::Minus1)?.flatten_all()?.to_vec1::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmask_on_tensors_equals_masking_rows() {
        use candle_core::{Device, Tensor};
        let (rows, vocab) = (3usize, 21usize);
        let mut rng = SplitMix64::new(3);
        let logits: Vec<f32> = (0..rows * vocab).map(|_| rng.next_f64() as f32 * 10.0 - 5.0).collect();
        let mut bits = vec![0u8; rows * vocab.div_ceil(8)];
        for (i, b) in bits.iter_mut().enumerate() {
            *b = (rng.next_u64() & 0xff) as u8 | u8::from(i == 0);
        }
        let t = Tensor::from_vec(logits.clone(), (rows, vocab), &Device::Cpu).unwrap();
        let masked: Vec<Vec<f32>> = apply_bitmask(&t, &bits).unwrap().to_vec2().unwrap();
        for r in 0..rows {
            for v in 0..vocab {
                let on = bits[r * vocab.div_ceil(8) + v / 8] >> (v % 8) & 1 == 1;
                let want = if on { logits[r * vocab + v] } else { f32::NEG_INFINITY };
                assert_eq!(masked[r][v], want, "row {r} token {v}");
            }
            let host = argmax(&masked[r]);
            assert_eq!(
                argmax_rows(&Tensor::new(masked[r].as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap(),
                vec![host]
            );
        }
    }

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

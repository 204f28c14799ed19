//! A generator of CIFAR-100-format data with learnable class structure, for tests, benchmarks and
//! machines that cannot fetch the real set (`trainq-worker gen-cifar --out DIR`).
//!
//! Writes `<DIR>/cifar-100-binary/{train.bin, test.bin, fine_label_names.txt,
//! coarse_label_names.txt}` in exactly the official binary format (see [`super::cifar`]), so the
//! real loader reads it unchanged. Every fine class has its own template, fixed by the class id
//! alone: a pair of saturated colours laid out as soft stripes of a class-specific orientation,
//! frequency and phase, plus a soft disc of a class-specific colour, radius and position. Each
//! image is its class's template with a random shift of the stripes, a random jitter of the disc,
//! in half the images a random "distractor" square, a random brightness and pixel noise. So a
//! conditional model can learn the templates from the label, and has per-image variation (shift,
//! jitter, distractor) left to learn through its latent code: neither noise nor trivially
//! saturated after one epoch. The coarse label is `fine / 5`. Colours stay near 0 and 1 so the
//! irreducible part of a Bernoulli (BCE) likelihood stays small next to what can be learned.
//!
//! Deterministic: the same arguments give the same bytes (a hand-written SplitMix64 whose stream
//! never changes, not a library PRNG whose algorithm may). Pure Rust, no tch; 6,000 images take
//! about half a second in a debug build.
//! Must not be mistaken for the real set: label names are `synth_class_NN` / `synth_group_NN`, and
//! the command refuses to overwrite existing files unless told to.

use std::f32::consts::PI;
use std::io;
use std::path::{Path, PathBuf};

use super::cifar::{
    COARSE_CLASSES, COARSE_NAMES_FILE, DIR_NAME, FINE_CLASSES, FINE_NAMES_FILE, PIXELS,
    RECORD_BYTES, SIDE, TEST_FILE, TRAIN_FILE,
};

/// `trainq-worker gen-cifar`: write a synthetic CIFAR-100-format set.
#[derive(Debug, Clone, clap::Args)]
pub struct GenArgs {
    /// Data dir to write into; the files go to `<OUT>/cifar-100-binary/`.
    #[arg(long)]
    pub out: PathBuf,
    /// Records in train.bin.
    #[arg(long, default_value_t = 5000)]
    pub train: usize,
    /// Records in test.bin.
    #[arg(long, default_value_t = 1000)]
    pub test: usize,
    /// Seed of the per-image variation (the class templates do not depend on it).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fine classes used, labels 0..classes (at most 100); records are spread evenly over them.
    #[arg(long, default_value_t = 100)]
    pub classes: usize,
    /// Replace train.bin / test.bin if they already exist.
    #[arg(long)]
    pub force: bool,
}

/// Runs `gen-cifar`.
pub fn run(args: GenArgs) -> anyhow::Result<()> {
    let dir = args.out.join(DIR_NAME);
    if !args.force {
        for f in [TRAIN_FILE, TEST_FILE] {
            let p = dir.join(f);
            anyhow::ensure!(
                !p.exists(),
                "{} already exists; pass --force to replace it with generated data",
                p.display()
            );
        }
    }
    let start = std::time::Instant::now();
    let opts = GenOptions {
        train: args.train,
        test: args.test,
        seed: args.seed,
        classes: args.classes,
    };
    let written = write_cifar100_with(&args.out, &opts)?;
    println!(
        "wrote {} train and {} test records ({} classes, seed {}) to {} in {:.2}s",
        args.train,
        args.test,
        args.classes,
        args.seed,
        written.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenOptions {
    pub train: usize,
    pub test: usize,
    pub seed: u64,
    /// 1..=100.
    pub classes: usize,
}

/// Writes `<data_dir>/cifar-100-binary/{train.bin, test.bin, fine_label_names.txt,
/// coarse_label_names.txt}` with `train` and `test` records over all 100 classes, replacing
/// existing files. `data_dir` is what [`super::DataCache::cifar100`] then takes.
pub fn write_cifar100(data_dir: &Path, train: usize, test: usize, seed: u64) -> io::Result<()> {
    write_cifar100_with(
        data_dir,
        &GenOptions {
            train,
            test,
            seed,
            classes: FINE_CLASSES,
        },
    )
    .map(|_| ())
}

/// [`write_cifar100`] with every option; returns the folder written.
pub fn write_cifar100_with(data_dir: &Path, opts: &GenOptions) -> io::Result<PathBuf> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    if !(1..=FINE_CLASSES).contains(&opts.classes) {
        return Err(invalid(format!(
            "classes must be 1..={FINE_CLASSES}, got {}",
            opts.classes
        )));
    }
    if opts.train == 0 || opts.test == 0 {
        return Err(invalid(
            "train and test must each be at least 1 record (an empty file is not a valid set)"
                .into(),
        ));
    }
    let dir = data_dir.join(DIR_NAME);
    std::fs::create_dir_all(&dir)?;
    let styles: Vec<ClassStyle> = (0..opts.classes).map(ClassStyle::new).collect();
    let fine_names: String = (0..FINE_CLASSES)
        .map(|c| format!("synth_class_{c:02}\n"))
        .collect();
    let coarse_names: String = (0..COARSE_CLASSES)
        .map(|c| format!("synth_group_{c:02}\n"))
        .collect();
    write_atomic(&dir, FINE_NAMES_FILE, fine_names.as_bytes())?;
    write_atomic(&dir, COARSE_NAMES_FILE, coarse_names.as_bytes())?;
    let test = records(&styles, opts.test, mix(opts.seed, 2));
    write_atomic(&dir, TEST_FILE, &test)?;
    let train = records(&styles, opts.train, mix(opts.seed, 1));
    write_atomic(&dir, TRAIN_FILE, &train)?;
    Ok(dir)
}

/// Writes `bytes` to `dir/name` through a temporary file and a rename, so a reader never sees a
/// partial file.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.{}.gen", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// `n` records over the classes of `styles`, evenly spread and shuffled, from the stream `seed`.
pub fn records(styles: &[ClassStyle], n: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64(seed);
    let mut labels: Vec<usize> = (0..n).map(|i| i % styles.len().max(1)).collect();
    for i in (1..labels.len()).rev() {
        labels.swap(i, rng.below(i + 1));
    }
    let mut out = Vec::with_capacity(n * RECORD_BYTES);
    let mut img = vec![0f32; PIXELS];
    for &fine in &labels {
        styles[fine].render(&mut rng, &mut img);
        out.push((fine / 5) as u8);
        out.push(fine as u8);
        out.extend(img.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8));
    }
    out
}

/// Near-black and near-white channel values: colours are the 8 corners of the RGB cube.
const LO: f32 = 0.02;
const HI: f32 = 0.98;
/// How far the stripes shift per image, in pixels, each way (the canvas margin).
const MARGIN: usize = 8;
const CANVAS: usize = SIDE + 2 * MARGIN;
/// How far the disc moves per image, in pixels, each way.
const JITTER: usize = 5;
/// Peak pixel noise (triangular on `[-NOISE, NOISE]`, standard deviation `NOISE / sqrt(6)`).
const NOISE: f32 = 0.05;

fn palette(i: usize) -> [f32; 3] {
    [0, 1, 2].map(|b| if (i >> b) & 1 == 1 { HI } else { LO })
}

/// One fine class's template: its stripes on a canvas larger than the image (so shifts are
/// lookups), and its disc.
pub struct ClassStyle {
    /// `3 x CANVAS x CANVAS`, channel-major.
    canvas: Vec<f32>,
    disc_colour: [f32; 3],
    /// Alpha of the disc, `(2h+1)^2`, centred.
    sprite: Vec<f32>,
    half: usize,
    /// Top-left of the sprite before jitter, in image pixels.
    disc_x: usize,
    disc_y: usize,
}

impl ClassStyle {
    /// The template of fine class `class`, a function of the class id alone.
    pub fn new(class: usize) -> Self {
        let mut rng = SplitMix64(mix(0x00C1_FA00_5EED, class as u64));
        let a = rng.below(8);
        let b = (a + 1 + rng.below(7)) % 8;
        let mut d = rng.below(8);
        if d == a || d == b {
            d = (d + 1 + rng.below(6)) % 8;
        }
        let (ca, cb) = (palette(a), palette(b));
        let theta = rng.uniform() * PI;
        let freq = 0.8 + 1.7 * rng.uniform(); // cycles per image width
        let phase = rng.uniform() * 2.0 * PI;
        let (cos, sin) = (theta.cos(), theta.sin());
        let mut canvas = vec![0f32; 3 * CANVAS * CANVAS];
        let centre = CANVAS as f32 / 2.0;
        for y in 0..CANVAS {
            for x in 0..CANVAS {
                let u = (x as f32 - centre) * cos + (y as f32 - centre) * sin;
                let s = (2.0 * PI * freq * u / SIDE as f32 + phase).sin();
                let m = 0.5 + 0.5 * (2.5 * s).tanh();
                for c in 0..3 {
                    canvas[(c * CANVAS + y) * CANVAS + x] = ca[c] * (1.0 - m) + cb[c] * m;
                }
            }
        }
        let radius = 3.5 + 3.5 * rng.uniform();
        let half = radius.ceil() as usize + 1;
        let width = 2 * half + 1;
        let mut sprite = vec![0f32; width * width];
        for y in 0..width {
            for x in 0..width {
                let dist =
                    ((x as f32 - half as f32).powi(2) + (y as f32 - half as f32).powi(2)).sqrt();
                sprite[y * width + x] = ((radius - dist) / 1.5 + 0.5).clamp(0.0, 1.0);
            }
        }
        // Keep the disc inside the image after any jitter.
        let lo = JITTER;
        let hi = SIDE - width - JITTER;
        let disc_x = lo + rng.below(hi - lo + 1);
        let disc_y = lo + rng.below(hi - lo + 1);
        Self {
            canvas,
            disc_colour: palette(d),
            sprite,
            half,
            disc_x,
            disc_y,
        }
    }

    /// Draws one image of this class into `img` (`3 x 32 x 32`, values about `[0,1]`).
    fn render(&self, rng: &mut SplitMix64, img: &mut [f32]) {
        let side = SIDE;
        // Stripes, shifted.
        let dx = rng.below(2 * MARGIN + 1);
        let dy = rng.below(2 * MARGIN + 1);
        for c in 0..3 {
            for y in 0..side {
                let src = (c * CANVAS + y + dy) * CANVAS + dx;
                img[(c * side + y) * side..][..side].copy_from_slice(&self.canvas[src..][..side]);
            }
        }
        // The disc, jittered.
        let width = 2 * self.half + 1;
        let ox = self.disc_x + rng.below(2 * JITTER + 1) - JITTER;
        let oy = self.disc_y + rng.below(2 * JITTER + 1) - JITTER;
        for y in 0..width {
            for x in 0..width {
                let alpha = self.sprite[y * width + x];
                if alpha > 0.0 {
                    for c in 0..3 {
                        let p = &mut img[(c * side + oy + y) * side + ox + x];
                        *p = *p * (1.0 - alpha) + self.disc_colour[c] * alpha;
                    }
                }
            }
        }
        // A distractor square in half the images: only the latent code can know about it.
        if rng.below(2) == 1 {
            let size = 4 + rng.below(6);
            let sx = rng.below(side - size + 1);
            let sy = rng.below(side - size + 1);
            let colour = palette(rng.below(8));
            for (c, value) in colour.iter().enumerate() {
                for y in sy..sy + size {
                    img[(c * side + y) * side + sx..][..size].fill(*value);
                }
            }
        }
        // Brightness, then noise.
        let gain = 0.94 + 0.06 * rng.uniform();
        for p in img.iter_mut() {
            let (u, v) = rng.two_uniform();
            *p = *p * gain + (u + v - 1.0) * NOISE;
        }
    }
}

/// Mixes a seed with a stream id (two SplitMix64 steps).
fn mix(seed: u64, stream: u64) -> u64 {
    let mut r = SplitMix64(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
    r.next_u64() ^ stream
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and its stream is fixed forever.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Two independent uniforms in `[0, 1)` from one step (24 bits each).
    fn two_uniform(&mut self) -> (f32, f32) {
        let x = self.next_u64();
        let scale = 1.0 / (1u64 << 24) as f32;
        (
            (x >> 40) as f32 * scale,
            ((x >> 8) & 0xFF_FFFF) as f32 * scale,
        )
    }

    /// Uniform in `0..n` (`n >= 1`).
    fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::cifar::{self, CifarHost};

    #[test]
    fn generated_files_load_with_the_right_counts_and_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = std::time::Instant::now();
        write_cifar100(dir.path(), 5000, 1000, 0).expect("generate");
        let took = start.elapsed();
        let sub = dir.path().join(DIR_NAME);
        assert_eq!(
            std::fs::metadata(sub.join(TRAIN_FILE)).expect("meta").len(),
            5000 * 3074
        );
        let host = CifarHost::load_dir(&sub).expect("loads through the real loader");
        assert_eq!((host.train.len(), host.test.len()), (5000, 1000));
        let mut counts = [0usize; FINE_CLASSES];
        for (&f, &c) in host.train.fine.iter().zip(&host.train.coarse) {
            counts[f as usize] += 1;
            assert_eq!(c, f / 5, "coarse = fine / 5");
        }
        assert!(counts.iter().all(|&n| n == 50), "balanced: {counts:?}");
        assert!(host.test.fine.iter().all(|&f| f < 100));
        assert!(host.test.coarse.iter().all(|&c| c < 20));
        let names = std::fs::read_to_string(sub.join(FINE_NAMES_FILE)).expect("names");
        assert_eq!(names.lines().count(), 100);
        let names = std::fs::read_to_string(sub.join(COARSE_NAMES_FILE)).expect("names");
        assert_eq!(names.lines().count(), 20);
        // Pixels use the range: not all dark, not all bright, not constant.
        let mean = host.train.pixels.iter().map(|&b| b as f64).sum::<f64>()
            / host.train.pixels.len() as f64;
        assert!((60.0..200.0).contains(&mean), "mean pixel {mean}");
        eprintln!("generated 6000 images in {took:?} (debug build)");
        assert!(
            took < std::time::Duration::from_secs(10),
            "generation is fast: {took:?}"
        );
    }

    /// Mean image (f64, 3072) of class `fine` in `split`.
    fn class_mean(split: &cifar::CifarSplit, fine: u8) -> Vec<f64> {
        let mut sum = vec![0f64; PIXELS];
        let mut n = 0;
        for (i, &f) in split.fine.iter().enumerate() {
            if f == fine {
                n += 1;
                for (s, &p) in sum.iter_mut().zip(&split.pixels[i * PIXELS..][..PIXELS]) {
                    *s += p as f64 / 255.0;
                }
            }
        }
        sum.iter().map(|s| s / n as f64).collect()
    }

    fn mean_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64
    }

    #[test]
    fn classes_have_their_own_structure_and_images_vary_within_a_class() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_cifar100_with(
            dir.path(),
            &GenOptions {
                train: 2000,
                test: 400,
                seed: 3,
                classes: 10,
            },
        )
        .expect("generate");
        let host = CifarHost::load_dir(&dir.path().join(DIR_NAME)).expect("load");
        assert!(host.train.fine.iter().all(|&f| f < 10), "--classes 10");
        let means: Vec<Vec<f64>> = (0..10).map(|c| class_mean(&host.train, c)).collect();
        // Class means differ clearly (pixel values in [0,1]; the sampling error of a mean of 200
        // images is about 0.003): every pair somewhat, most pairs by a lot.
        let mut far = 0;
        for a in 0..10 {
            for b in a + 1..10 {
                let d = mean_abs_diff(&means[a], &means[b]);
                assert!(
                    d > 0.04,
                    "classes {a} and {b} have mean images only {d} apart"
                );
                far += usize::from(d > 0.15);
            }
        }
        assert!(
            far >= 36,
            "only {far} of 45 class pairs differ by more than 0.15"
        );
        // The test split has the same class structure: its class means are close to train's.
        let test0 = class_mean(&host.test, 0);
        let same = mean_abs_diff(&test0, &means[0]);
        let other = mean_abs_diff(&test0, &means[1]);
        assert!(
            same < other / 2.0,
            "test class 0 near train class 0: {same} vs {other}"
        );
        // Images of one class are not copies: their spread around the class mean is real.
        let mut spread = 0.0;
        let mut n = 0;
        for (i, &f) in host.train.fine.iter().enumerate() {
            if f == 0 {
                let img: Vec<f64> = host.train.pixels[i * PIXELS..][..PIXELS]
                    .iter()
                    .map(|&p| p as f64 / 255.0)
                    .collect();
                spread += mean_abs_diff(&img, &means[0]);
                n += 1;
            }
        }
        let spread = spread / n as f64;
        assert!(
            (0.05..0.4).contains(&spread),
            "within-class spread {spread}"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes_and_another_seed_does_not() {
        let read = |d: &Path, f: &str| std::fs::read(d.join(DIR_NAME).join(f)).expect("read");
        let (a, b, c) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        write_cifar100(a.path(), 300, 50, 11).expect("a");
        write_cifar100(b.path(), 300, 50, 11).expect("b");
        write_cifar100(c.path(), 300, 50, 12).expect("c");
        for f in [TRAIN_FILE, TEST_FILE, FINE_NAMES_FILE, COARSE_NAMES_FILE] {
            assert_eq!(read(a.path(), f), read(b.path(), f), "{f}");
        }
        assert_ne!(read(a.path(), TRAIN_FILE), read(c.path(), TRAIN_FILE));
        assert_ne!(
            read(a.path(), TRAIN_FILE)[..3074 * 50],
            read(a.path(), TEST_FILE)[..]
        );
    }

    #[test]
    fn bad_options_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = |classes, train| GenOptions {
            train,
            test: 1,
            seed: 0,
            classes,
        };
        assert!(write_cifar100_with(dir.path(), &opts(0, 10)).is_err());
        assert!(write_cifar100_with(dir.path(), &opts(101, 10)).is_err());
        assert!(write_cifar100_with(dir.path(), &opts(10, 0)).is_err());
        write_cifar100_with(dir.path(), &opts(1, 3)).expect("one class is fine");
    }

    #[test]
    fn the_command_refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = |force| GenArgs {
            out: dir.path().to_path_buf(),
            train: 20,
            test: 5,
            seed: 0,
            classes: 100,
            force,
        };
        run(args(false)).expect("first run");
        let err = run(args(false)).expect_err("exists").to_string();
        assert!(
            err.contains("train.bin") && err.contains("--force"),
            "{err}"
        );
        run(args(true)).expect("forced");
    }
}

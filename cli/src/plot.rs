//! `trainq plot`: one chart (PNG or SVG) of several jobs' series of one metric.
//!
//! Text is drawn with ab_glyph from DejaVu Sans, embedded in the binary (cli/assets; Bitstream
//! Vera licence, see cli/assets/DejaVuSans-LICENSE.txt), so charts render on machines without
//! fontconfig or system fonts. Drawing only: fetching the series is the caller's job.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Registers the embedded font as `sans-serif` (once per process).
pub fn register_font() {
    REGISTER.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            panic!("the embedded DejaVu Sans font does not parse");
        }
    });
}

/// One labelled line, optionally with a shaded band around it (`trainq report`: the mean over
/// seeds with a band of plus or minus one standard deviation).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// (x, low, high) per x, in x order; empty for no band.
    pub band: Vec<(f64, f64, f64)>,
}

/// What the chart shows.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub series: Vec<Series>,
}

pub const SIZE: (u32, u32) = (1024, 640);

/// Draws the chart to `path`: SVG when the extension is `.svg`, PNG otherwise.
pub fn draw(chart: &Chart, path: &Path) -> anyhow::Result<()> {
    register_font();
    let svg = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    if svg {
        draw_on(chart, SVGBackend::new(path, SIZE).into_drawing_area())
    } else {
        draw_on(chart, BitMapBackend::new(path, SIZE).into_drawing_area())
    }
}

/// The x and y ranges holding every point, padded so no line sits on the frame.
fn bounds(series: &[Series]) -> ((f64, f64), (f64, f64)) {
    let band = series
        .iter()
        .flat_map(|s| s.band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]));
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .chain(band);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return ((0.0, 1.0), (0.0, 1.0));
    }
    let pad = |lo: f64, hi: f64, frac: f64| {
        let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
        (lo - span * frac, hi + span * frac)
    };
    let (x0, x1) = if x1 > x0 { (x0, x1) } else { pad(x0, x1, 0.5) };
    (pad(x0, x1, 0.02), pad(y0, y1, 0.08))
}

fn draw_on<DB>(chart: &Chart, root: DrawingArea<DB, Shift>) -> anyhow::Result<()>
where
    DB: DrawingBackend,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the chart: {e}");
    root.fill(&WHITE).map_err(err)?;
    let ((x0, x1), (y0, y1)) = bounds(&chart.series);
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    // Epochs and steps are whole numbers: no "1.5" ticks when there are few of them.
    let integral = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .all(|(x, _)| x.fract() == 0.0);
    let whole = |x: &f64| format!("{x:.0}");
    let plain = |x: &f64| format!("{x}");
    let span = (x1 - x0).round().max(1.0) as usize;
    let mut mesh = ctx.configure_mesh();
    if integral && span <= 12 {
        mesh.x_labels(span + 1).x_label_formatter(&whole);
    } else if integral {
        mesh.x_label_formatter(&whole);
    } else {
        mesh.x_label_formatter(&plain);
    }
    mesh.x_desc(&chart.x_desc)
        .y_desc(&chart.y_desc)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(err)?;
    // Bands first, so every line stays visible on top of them.
    for (i, s) in chart.series.iter().enumerate() {
        if s.band.len() < 2 {
            continue;
        }
        let color = Palette99::pick(i).to_rgba();
        let outline: Vec<(f64, f64)> = s
            .band
            .iter()
            .map(|&(x, _, hi)| (x, hi))
            .chain(s.band.iter().rev().map(|&(x, lo, _)| (x, lo)))
            .collect();
        ctx.draw_series(std::iter::once(Polygon::new(
            outline,
            color.mix(0.18).filled(),
        )))
        .map_err(err)?;
    }
    for (i, s) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        ctx.draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(&s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    ctx.configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Points of one metric as (x, value), x being the epoch or the step. With x = epoch, a metric
/// reported several times per epoch (train/loss) keeps the epoch's last point.
pub fn series_points(points: &[proto::v1::MetricPoint], by_epoch: bool) -> Vec<(f64, f64)> {
    let mut sorted: Vec<_> = points.iter().collect();
    sorted.sort_by_key(|p| p.step);
    let mut out: Vec<(f64, f64)> = Vec::new();
    for p in sorted {
        let x = if by_epoch {
            f64::from(p.epoch)
        } else {
            p.step as f64
        };
        match out.last_mut() {
            Some(last) if last.0 == x => last.1 = p.value,
            _ => out.push((x, p.value)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> Chart {
        Chart {
            title: "test/neg_elbo_nats per epoch".into(),
            x_desc: "epoch".into(),
            y_desc: "test/neg_elbo_nats".into(),
            series: vec![
                Series {
                    label: "cvae-transfer".into(),
                    points: vec![(1.0, 700.0), (2.0, 650.0), (3.0, 630.0)],
                    band: vec![
                        (1.0, 690.0, 710.0),
                        (2.0, 645.0, 655.0),
                        (3.0, 628.0, 632.0),
                    ],
                },
                Series {
                    label: "cvae-random".into(),
                    points: vec![(1.0, 720.0), (2.0, 660.0), (3.0, 640.0)],
                    band: vec![],
                },
            ],
        }
    }

    #[test]
    fn a_png_chart_is_written_without_system_fonts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chart.png");
        draw(&chart(), &path).expect("draw png");
        let bytes = std::fs::read(&path).expect("read png");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        if let Ok(keep) = std::env::var("TRAINQ_KEEP_CHART") {
            std::fs::copy(&path, keep).expect("keep chart");
        }
    }

    #[test]
    fn an_svg_chart_carries_its_labels_as_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chart.svg");
        draw(&chart(), &path).expect("draw svg");
        let text = std::fs::read_to_string(&path).expect("read svg");
        assert!(text.starts_with("<svg"), "{}", &text[..50.min(text.len())]);
        for label in [
            "cvae-transfer",
            "cvae-random",
            "test/neg_elbo_nats per epoch",
        ] {
            assert!(text.contains(label), "{label} missing");
        }
    }

    #[test]
    fn by_epoch_a_series_keeps_the_last_point_of_each_epoch() {
        let p = |step, epoch, value| proto::v1::MetricPoint {
            name: "train/loss".into(),
            step,
            epoch,
            value,
        };
        let points = [p(40, 2, 0.4), p(10, 1, 0.9), p(20, 1, 0.7), p(30, 2, 0.5)];
        assert_eq!(series_points(&points, true), vec![(1.0, 0.7), (2.0, 0.4)]);
        assert_eq!(series_points(&points, false).len(), 4);
    }

    #[test]
    fn a_single_point_still_gets_a_visible_range() {
        let ((x0, x1), (y0, y1)) = bounds(&[Series {
            label: "a".into(),
            points: vec![(1.0, 5.0)],
            band: vec![],
        }]);
        assert!(x0 < 1.0 && x1 > 1.0 && y0 < 5.0 && y1 > 5.0);
    }
}

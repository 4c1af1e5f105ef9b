//! PNG charts for the robustness report of `pandaguard evaluate`: certified accuracy
//! against L2 radius, accuracy bars per defense preset, and strips showing an
//! adversarial example beside its original and its amplified perturbation.
//!
//! Charts are drawn with `plotters` into an in-memory RGB buffer and encoded with the
//! `image` crate we already depend on (plotters' own encoder would pull a second
//! `image` version). Text is rasterised by ab_glyph from a TrueType font found at run
//! time (see [`ensure_font`]): the binary carries no font and the build downloads
//! nothing. The functions take plain data and write one file, so the report code can
//! call them without knowing anything about plotting.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use image::{ImageFormat, Rgb, RgbImage};
use plotters::backend::RGBPixel;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::imaging::ModelImage;

/// One line of a line chart: `points` are (x, y) pairs, drawn in order of x.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One group of bars, e.g. the defense preset `"default"` with the bars
/// `[("clean", 0.95), ("transfer 4/255", 0.9), ("adaptive 4/255", 0.4)]`. Bars with the
/// same label in different groups form one series and share a colour.
#[derive(Debug, Clone, PartialEq)]
pub struct AccuracyBars {
    pub group: String,
    pub bars: Vec<(String, f64)>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChartError {
    /// No usable font: without one every label would be missing, so we refuse to draw.
    #[error("chart text needs a TrueType font: {0}")]
    Font(String),
    #[error(
        "example images differ in size: original {original_width}×{original_height}, \
         adversarial {adversarial_width}×{adversarial_height}"
    )]
    SizeMismatch { original_width: usize, original_height: usize, adversarial_width: usize, adversarial_height: usize },
    #[error("invalid chart input: {0}")]
    InvalidInput(String),
    #[error("drawing the chart failed: {0}")]
    Drawing(String),
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// Size of the line and bar charts: wide enough for a legend column beside the plot,
/// and readable when the PNG is shown at its natural size in a Markdown report.
pub const CHART_SIZE: (u32, u32) = (900, 560);

/// Environment variable naming a `.ttf` file to use instead of the search below.
pub const FONT_ENV: &str = "PANDAGUARD_FONT";

/// The family name every text style in this module asks for; plotters' own defaults
/// (mesh labels we do not style) use the same name, so one registration covers all.
const FONT_FAMILY: &str = "sans-serif";

/// Where the pinned matplotlib wheel in `.venv` keeps DejaVu Sans, below `lib/pythonX.Y/`.
const MATPLOTLIB_FONT: &str = "site-packages/matplotlib/mpl-data/fonts/ttf/DejaVuSans.ttf";

/// Fonts that common systems install; tried after `.venv`, in this order.
const SYSTEM_FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Matplotlib's default colour cycle ("tab10"): distinguishable, and the same colours
/// readers know from the Python notebooks.
const SERIES_COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

pub(crate) const TEXT_COLOUR: RGBColor = RGBColor(30, 30, 30);
pub(crate) const MUTED_TEXT_COLOUR: RGBColor = RGBColor(120, 120, 120);
const GRID_COLOUR: RGBColor = RGBColor(215, 215, 215);

const TITLE_FONT_SIZE: f64 = 24.0;
const AXIS_DESC_FONT_SIZE: f64 = 18.0;
const TICK_FONT_SIZE: f64 = 15.0;
const LEGEND_FONT_SIZE: f64 = 16.0;
const BAR_VALUE_FONT_SIZE: f64 = 13.0;
const CAPTION_FONT_SIZE: f64 = 15.0;

/// Height of the band holding the chart title.
const TITLE_BAND_HEIGHT: u32 = 48;
/// Width of the legend column to the right of the plot: a legend inside the plot would
/// hide data (certified-accuracy curves and bars near 100% fill the upper corners).
const LEGEND_WIDTH: u32 = 200;

fn series_colour(index: usize) -> RGBColor {
    SERIES_COLOURS[index % SERIES_COLOURS.len()]
}

pub(crate) fn text_style(size: f64, colour: RGBColor) -> TextStyle<'static> {
    (FONT_FAMILY, size).into_font().color(&colour)
}

/// Makes sure a font is registered with plotters, once per process. The outcome is
/// cached: the places we look do not change while the process runs, and retrying on
/// every chart would only repeat the same error.
pub fn ensure_font() -> Result<(), ChartError> {
    static FONT_READY: OnceLock<Result<(), ChartError>> = OnceLock::new();
    FONT_READY.get_or_init(load_and_register_font).clone()
}

fn load_and_register_font() -> Result<(), ChartError> {
    let from_env = std::env::var_os(FONT_ENV).filter(|value| !value.is_empty()).map(PathBuf::from);
    // `.venv` relative to the working directory (the binary run from the project) and to
    // the crate root (tests and `cargo run` from elsewhere).
    let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let system: Vec<&Path> = SYSTEM_FONTS.iter().map(Path::new).collect();
    let path = find_font(from_env.as_deref(), &roots, &system)?;
    let bytes = std::fs::read(&path).map_err(|e| ChartError::Font(format!("{}: {e}", path.display())))?;
    // plotters keeps fonts for the life of the process and wants `'static` bytes; this
    // runs once (guarded by `ensure_font`), so leaking one font file is the price.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| ChartError::Font(format!("{}: not a TrueType/OpenType font", path.display())))
}

/// Finds the font file: `from_env` when given (an explicit choice that does not exist is
/// an error, not something to silently replace), else DejaVu Sans from matplotlib in
/// `<root>/.venv/lib/python*/`, for each root in order, else the first `system` path
/// that exists.
fn find_font(from_env: Option<&Path>, roots: &[PathBuf], system: &[&Path]) -> Result<PathBuf, ChartError> {
    if let Some(path) = from_env {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(ChartError::Font(format!("{FONT_ENV}={} is not a readable file", path.display())))
        };
    }
    let mut tried = Vec::new();
    for root in roots {
        let venv_lib = root.join(".venv").join("lib");
        let mut pythons: Vec<PathBuf> = std::fs::read_dir(&venv_lib)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with("python"))
            .map(|entry| entry.path())
            .collect();
        // Sorted so that the choice does not depend on directory order.
        pythons.sort();
        for python in pythons {
            let candidate = python.join(MATPLOTLIB_FONT);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        tried.push(venv_lib.join("python*").join(MATPLOTLIB_FONT));
    }
    for &candidate in system {
        if candidate.is_file() {
            return Ok(candidate.to_path_buf());
        }
        tried.push(candidate.to_path_buf());
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(ChartError::Font(format!(
        "none found (looked at {}); set {FONT_ENV} to a .ttf file, or run `make setup` to install \
         matplotlib (it ships DejaVuSans.ttf) into .venv",
        tried.join(", ")
    )))
}

pub(crate) fn drawing_error(error: impl std::fmt::Display) -> ChartError {
    ChartError::Drawing(error.to_string())
}

pub(crate) type Area<'a> = DrawingArea<BitMapBackend<'a, RGBPixel>, Shift>;

/// Draws onto `pixels` (RGB, `size.0 × size.1`, already holding any background) with
/// `draw`, then writes the result to `path` as PNG.
pub(crate) fn render_png(
    path: &Path,
    size: (u32, u32),
    mut pixels: Vec<u8>,
    draw: impl FnOnce(&Area) -> Result<(), ChartError>,
) -> Result<(), ChartError> {
    ensure_font()?;
    {
        let backend = BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut pixels, size).map_err(drawing_error)?;
        let root = backend.into_drawing_area();
        draw(&root)?;
        root.present().map_err(drawing_error)?;
    }
    let image = RgbImage::from_raw(size.0, size.1, pixels)
        .ok_or_else(|| ChartError::Drawing(format!("pixel buffer does not hold {}×{} pixels", size.0, size.1)))?;
    image
        .save_with_format(path, ImageFormat::Png)
        .map_err(|e| ChartError::Write { path: path.to_path_buf(), message: e.to_string() })
}

pub(crate) fn white_pixels((width, height): (u32, u32)) -> Vec<u8> {
    vec![255; width as usize * height as usize * 3]
}

/// Pixel width of `text` in `style`.
fn text_width(style: &TextStyle, text: &str) -> Result<u32, ChartError> {
    style.font.box_size(text).map(|(width, _)| width).map_err(|e| ChartError::Font(e.to_string()))
}

/// `text`, shortened with "…" until it fits `max_width` pixels, so that a long preset
/// name cannot run into its neighbour.
pub(crate) fn fit_text(style: &TextStyle, text: &str, max_width: u32) -> Result<String, ChartError> {
    if text_width(style, text)? <= max_width {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let candidate: String = chars.iter().collect::<String>().trim_end().to_string() + "…";
        if text_width(style, &candidate)? <= max_width {
            return Ok(candidate);
        }
    }
    Ok(String::new())
}

/// Splits `text` into lines of at most `max_width` pixels at spaces. A single word wider
/// than the line is shortened with "…" rather than overflowing into the next panel.
fn wrap_text(style: &TextStyle, text: &str, max_width: u32) -> Result<Vec<String>, ChartError> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        let candidate = if current.is_empty() { word.to_string() } else { format!("{current} {word}") };
        if text_width(style, &candidate)? <= max_width {
            current = candidate;
            continue;
        }
        if !current.is_empty() {
            lines.push(std::mem::take(&mut current));
        }
        current = fit_text(style, word, max_width)?;
    }
    if !current.is_empty() {
        lines.push(current);
    }
    Ok(lines)
}

/// Draws the title centred in a band at the top of `root` and returns the area below.
/// (plotters' `titled` leaves only 5 px above the text, and ab_glyph draws ascenders a
/// little above the anchor, which would clip capitals at the top edge.)
pub(crate) fn draw_title<'a>(root: &Area<'a>, title: &str) -> Result<Area<'a>, ChartError> {
    let (width, _) = root.dim_in_pixel();
    let style = text_style(TITLE_FONT_SIZE, TEXT_COLOUR).pos(Pos::new(HPos::Center, VPos::Center));
    let title = fit_text(&style, title, width.saturating_sub(40))?;
    root.draw_text(&title, &style, (width as i32 / 2, TITLE_BAND_HEIGHT as i32 / 2 + 4)).map_err(drawing_error)?;
    Ok(root.split_vertically(TITLE_BAND_HEIGHT).1)
}

/// How a legend entry shows its series.
#[derive(Clone, Copy)]
enum LegendMark {
    /// A short line with a dot, like the curve it stands for.
    Line,
    /// A filled square, like a bar.
    Swatch,
}

/// Draws a vertical legend (mark + label per entry) into the legend column.
fn draw_legend(area: &Area, entries: &[(&str, RGBColor)], mark: LegendMark) -> Result<(), ChartError> {
    const LINE_HEIGHT: i32 = 28;
    const FIRST_LINE_Y: i32 = 30;
    const MARK_LEFT: i32 = 8;
    const LABEL_LEFT: i32 = 44;
    let (width, _) = area.dim_in_pixel();
    let style = text_style(LEGEND_FONT_SIZE, TEXT_COLOUR).pos(Pos::new(HPos::Left, VPos::Center));
    for (index, (label, colour)) in entries.iter().enumerate() {
        let y = FIRST_LINE_Y + index as i32 * LINE_HEIGHT;
        match mark {
            LegendMark::Line => {
                area.draw(&PathElement::new(vec![(MARK_LEFT, y), (MARK_LEFT + 28, y)], colour.stroke_width(3)))
                    .map_err(drawing_error)?;
                area.draw(&Circle::new((MARK_LEFT + 14, y), 4, colour.filled())).map_err(drawing_error)?;
            }
            LegendMark::Swatch => {
                area.draw(&Rectangle::new([(MARK_LEFT + 6, y - 8), (MARK_LEFT + 22, y + 8)], colour.filled()))
                    .map_err(drawing_error)?;
            }
        }
        let label = fit_text(&style, label, width.saturating_sub(LABEL_LEFT as u32 + 8))?;
        area.draw_text(&label, &style, (LABEL_LEFT, y)).map_err(drawing_error)?;
    }
    Ok(())
}

/// At most this many accuracy ticks, so plotters picks 0, 20 %, …, 100 %: accuracy
/// charts compare against round numbers.
const ACCURACY_TICKS: usize = 6;

fn percent_label(value: &f64) -> String {
    format!("{:.0}%", value * 100.0)
}

/// Certified accuracy (y, 0..1) against L2 radius (x), one curve per sigma or preset.
/// With no curves (or only empty ones) the axes are still drawn, with a note.
pub fn certified_accuracy_chart(path: &Path, title: &str, curves: &[Curve]) -> Result<(), ChartError> {
    accuracy_curves_chart(path, title, ("L2 radius", "certified accuracy"), curves)
}

/// Accuracy (y, 0..1) against a radius or budget (x), one curve per series.
pub fn accuracy_curves_chart(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    curves: &[Curve],
) -> Result<(), ChartError> {
    // Non-finite points (a 0/0 from an empty bucket) have no place on the axes and would
    // map to nonsense pixels; points are sorted by radius so unsorted input does not
    // draw as a zigzag.
    let cleaned: Vec<(&str, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|curve| {
            let mut points: Vec<(f64, f64)> =
                curve.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (curve.label.as_str(), points)
        })
        .collect();
    let max_radius = cleaned.iter().flat_map(|(_, points)| points.iter().map(|p| p.0)).fold(0.0, f64::max);
    // Radii start at 0; a chart whose curves stop at r = 0 (or have no points) still
    // needs a non-empty axis.
    let x_end = if max_radius > 0.0 { max_radius * 1.05 } else { 1.0 };
    let has_points = cleaned.iter().any(|(_, points)| !points.is_empty());

    render_png(path, CHART_SIZE, white_pixels(CHART_SIZE), |root| {
        let body = draw_title(root, title)?;
        let (plot_area, legend_area) = body.split_horizontally(CHART_SIZE.0 - LEGEND_WIDTH);
        let mut chart = ChartBuilder::on(&plot_area)
            .margin_left(12)
            .margin_right(24)
            .margin_top(12)
            .margin_bottom(12)
            .x_label_area_size(56)
            .y_label_area_size(76)
            // Up to 1.04 so that points at 100% are not cut in half by the frame.
            .build_cartesian_2d(0.0..x_end, 0.0..1.04)
            .map_err(drawing_error)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .axis_desc_style(text_style(AXIS_DESC_FONT_SIZE, TEXT_COLOUR))
            .label_style(text_style(TICK_FONT_SIZE, TEXT_COLOUR))
            .x_label_formatter(&|radius| format!("{radius:.2}"))
            .y_labels(ACCURACY_TICKS)
            .y_label_formatter(&percent_label)
            .bold_line_style(GRID_COLOUR)
            // Only the labelled grid lines: the fine ones plotters adds by default clutter the plot.
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(drawing_error)?;

        for (index, (_, points)) in cleaned.iter().enumerate() {
            let colour = series_colour(index);
            chart.draw_series(LineSeries::new(points.clone(), colour.stroke_width(3))).map_err(drawing_error)?;
            chart
                .draw_series(points.iter().map(|&point| Circle::new(point, 4, colour.filled())))
                .map_err(drawing_error)?;
        }
        if !has_points {
            let note = text_style(20.0, MUTED_TEXT_COLOUR).pos(Pos::new(HPos::Center, VPos::Center));
            chart
                .plotting_area()
                .draw(&Text::new("no certified-accuracy data", (x_end / 2.0, 0.5), note))
                .map_err(drawing_error)?;
        }
        let entries: Vec<(&str, RGBColor)> =
            cleaned.iter().enumerate().map(|(index, (label, _))| (*label, series_colour(index))).collect();
        draw_legend(&legend_area, &entries, LegendMark::Line)
    })
}

/// Grouped bar chart: accuracy (0..1) per group (preset), one coloured bar per series,
/// with a legend naming the series. A group without some series leaves that slot empty,
/// so a series sits at the same place in every group. With no groups the axes are
/// still drawn, with a note.
pub fn accuracy_bars_chart(path: &Path, title: &str, groups: &[AccuracyBars]) -> Result<(), ChartError> {
    // Series in order of first appearance: the caller's order is the reading order.
    let mut series: Vec<&str> = Vec::new();
    for group in groups {
        for (label, _) in &group.bars {
            if !series.contains(&label.as_str()) {
                series.push(label);
            }
        }
    }
    // The x axis counts in integer units, GROUP_UNITS per group: plotters can only put
    // ticks exactly at the group centres (custom key points) on an integer axis.
    const GROUP_UNITS: i32 = 1000;
    let group_count = groups.len().max(1);
    // 80% of each group holds bars, 10% on either side separates the groups.
    let slot_width = GROUP_UNITS * 8 / 10 / series.len().max(1) as i32;
    let group_centres: Vec<i32> = (0..groups.len() as i32).map(|index| index * GROUP_UNITS + GROUP_UNITS / 2).collect();

    render_png(path, CHART_SIZE, white_pixels(CHART_SIZE), |root| {
        let body = draw_title(root, title)?;
        let (plot_area, legend_area) = body.split_horizontally(CHART_SIZE.0 - LEGEND_WIDTH);

        // Group names are shortened to their share of the axis so neighbours never overlap.
        let tick_style = text_style(TICK_FONT_SIZE, TEXT_COLOUR);
        let approximate_plot_width = (CHART_SIZE.0 - LEGEND_WIDTH).saturating_sub(120);
        let group_name_width = (approximate_plot_width / group_count as u32).saturating_sub(8);
        let group_names: Vec<String> = groups
            .iter()
            .map(|group| fit_text(&tick_style, &group.group, group_name_width))
            .collect::<Result<_, _>>()?;
        let group_label = |centre: &i32| group_names.get((centre / GROUP_UNITS) as usize).cloned().unwrap_or_default();

        let mut chart = ChartBuilder::on(&plot_area)
            .margin_left(12)
            .margin_right(24)
            .margin_top(12)
            .margin_bottom(12)
            .x_label_area_size(56)
            .y_label_area_size(76)
            .build_cartesian_2d(
                (0..group_count as i32 * GROUP_UNITS).with_key_points(group_centres),
                // Up to 1.08 so the value printed above a bar at 100% stays inside the plot.
                0.0..1.08,
            )
            .map_err(drawing_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("defense preset")
            .y_desc("accuracy")
            .axis_desc_style(text_style(AXIS_DESC_FONT_SIZE, TEXT_COLOUR))
            .label_style(tick_style.clone())
            .x_label_formatter(&group_label)
            .y_labels(ACCURACY_TICKS)
            .y_label_formatter(&percent_label)
            .bold_line_style(GRID_COLOUR)
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(drawing_error)?;

        // Values are printed on the bars only when a bar is wide enough to hold "100%".
        let bar_pixel_width = chart.backend_coord(&(slot_width, 0.0)).0 - chart.backend_coord(&(0, 0.0)).0;
        let value_style = text_style(BAR_VALUE_FONT_SIZE, TEXT_COLOUR).pos(Pos::new(HPos::Center, VPos::Bottom));
        let show_values = bar_pixel_width >= 34;

        for (series_index, series_label) in series.iter().enumerate() {
            let colour = series_colour(series_index);
            let bars: Vec<(i32, f64)> = groups
                .iter()
                .enumerate()
                .filter_map(|(group_index, group)| {
                    let value = group.bars.iter().find(|(label, _)| label == series_label)?.1;
                    // Accuracy outside 0..1 (or NaN) is a bug upstream; draw what is
                    // meaningful rather than a bar through the frame.
                    value.is_finite().then(|| {
                        let left =
                            group_index as i32 * GROUP_UNITS + GROUP_UNITS / 10 + slot_width * series_index as i32;
                        (left, value.clamp(0.0, 1.0))
                    })
                })
                .collect();
            // A small gap on each side separates neighbouring bars of the same group.
            let gap = slot_width / 12;
            chart
                .draw_series(bars.iter().map(|&(left, value)| {
                    Rectangle::new([(left + gap, 0.0), (left + slot_width - gap, value)], colour.filled())
                }))
                .map_err(drawing_error)?;
            if show_values {
                chart
                    .draw_series(bars.iter().map(|&(left, value)| {
                        EmptyElement::at((left + slot_width / 2, value))
                            + Text::new(format!("{:.0}%", value * 100.0), (0, -4), value_style.clone())
                    }))
                    .map_err(drawing_error)?;
            }
        }
        if groups.is_empty() {
            let note = text_style(20.0, MUTED_TEXT_COLOUR).pos(Pos::new(HPos::Center, VPos::Center));
            chart
                .plotting_area()
                .draw(&Text::new("no accuracy data", (GROUP_UNITS / 2, 0.5), note))
                .map_err(drawing_error)?;
        }
        let entries: Vec<(&str, RGBColor)> =
            series.iter().enumerate().map(|(index, label)| (*label, series_colour(index))).collect();
        draw_legend(&legend_area, &entries, LegendMark::Swatch)
    })
}

/// Margin around and between the panels of an example strip.
const STRIP_PADDING: u32 = 12;
/// Space between an image and its caption.
const STRIP_CAPTION_GAP: u32 = 10;
/// Height of one caption line.
const STRIP_LINE_HEIGHT: u32 = 20;
/// Panels narrower than this (tiny test images, 32×32 models) get a wider column so
/// captions still wrap into a few readable lines.
const STRIP_MIN_COLUMN_WIDTH: u32 = 200;

/// Where the parts of an example strip go, in pixels.
struct StripLayout {
    column_width: u32,
    image_width: u32,
    image_height: u32,
    caption_lines: usize,
}

impl StripLayout {
    fn size(&self) -> (u32, u32) {
        let width = STRIP_PADDING + 3 * (self.column_width + STRIP_PADDING);
        let height = STRIP_PADDING
            + self.image_height
            + STRIP_CAPTION_GAP
            + self.caption_lines as u32 * STRIP_LINE_HEIGHT
            + STRIP_PADDING;
        (width, height)
    }

    fn column_left(&self, panel: usize) -> u32 {
        STRIP_PADDING + panel as u32 * (self.column_width + STRIP_PADDING)
    }

    /// Top-left pixel of panel `panel` (0 original, 1 adversarial, 2 perturbation).
    fn image_origin(&self, panel: usize) -> (u32, u32) {
        (self.column_left(panel) + (self.column_width - self.image_width) / 2, STRIP_PADDING)
    }

    fn caption_top(&self) -> u32 {
        STRIP_PADDING + self.image_height + STRIP_CAPTION_GAP
    }
}

/// Largest side we accept for an example image: model inputs are a few hundred pixels,
/// and anything far larger is a caller mix-up that would allocate a huge strip.
const STRIP_MAX_SIDE: usize = 4096;

fn check_model_image(name: &str, image: &ModelImage) -> Result<(), ChartError> {
    if image.width == 0 || image.height == 0 || image.width > STRIP_MAX_SIDE || image.height > STRIP_MAX_SIDE {
        return Err(ChartError::InvalidInput(format!(
            "{name} image is {}×{}; expected 1 to {STRIP_MAX_SIDE} pixels a side",
            image.width, image.height
        )));
    }
    let expected = 3 * image.width * image.height;
    if image.data.len() != expected {
        return Err(ChartError::InvalidInput(format!(
            "{name} image has {} values; {}×{} RGB needs {expected}",
            image.data.len(),
            image.width,
            image.height
        )));
    }
    Ok(())
}

/// The perturbation made visible: 0.5 + gain · (adversarial − original) per value,
/// clipped to [0, 1], so mid-grey means "unchanged" and an L∞ budget of a few /255
/// becomes a visible pattern.
fn amplified_perturbation(original: &ModelImage, adversarial: &ModelImage, gain: f32) -> ModelImage {
    let data = original
        .data
        .iter()
        .zip(&adversarial.data)
        .map(|(clean, attacked)| (0.5 + gain * (attacked - clean)).clamp(0.0, 1.0))
        .collect();
    ModelImage { width: original.width, height: original.height, data }
}

/// One strip per example: original | adversarial | perturbation amplified ×`gain`, side
/// by side at model-input size (no resampling, so what is shown is what the model saw),
/// with `captions[i]` wrapped under panel i.
pub fn example_strip(
    path: &Path,
    original: &ModelImage,
    adversarial: &ModelImage,
    gain: f32,
    captions: [&str; 3],
) -> Result<(), ChartError> {
    check_model_image("original", original)?;
    check_model_image("adversarial", adversarial)?;
    if (original.width, original.height) != (adversarial.width, adversarial.height) {
        return Err(ChartError::SizeMismatch {
            original_width: original.width,
            original_height: original.height,
            adversarial_width: adversarial.width,
            adversarial_height: adversarial.height,
        });
    }
    if !gain.is_finite() {
        return Err(ChartError::InvalidInput(format!("perturbation gain {gain} is not a finite number")));
    }
    // Measuring captions needs the font before the strip's height is known.
    ensure_font()?;

    let image_width = original.width as u32;
    let image_height = original.height as u32;
    let column_width = image_width.max(STRIP_MIN_COLUMN_WIDTH);
    let caption_style = text_style(CAPTION_FONT_SIZE, TEXT_COLOUR).pos(Pos::new(HPos::Center, VPos::Top));
    let caption_lines: Vec<Vec<String>> = captions
        .iter()
        .map(|caption| wrap_text(&caption_style, caption, column_width.saturating_sub(4)))
        .collect::<Result<_, _>>()?;
    let layout = StripLayout {
        column_width,
        image_width,
        image_height,
        caption_lines: caption_lines.iter().map(Vec::len).max().unwrap_or(0),
    };

    // The panels are copied in as pixels (plotters would resample them); plotters then
    // only adds the captions on top of the same buffer.
    let size = layout.size();
    let mut canvas = RgbImage::from_pixel(size.0, size.1, Rgb([255, 255, 255]));
    let panels =
        [original.to_rgb(), adversarial.to_rgb(), amplified_perturbation(original, adversarial, gain).to_rgb()];
    for (index, panel) in panels.iter().enumerate() {
        let (left, top) = layout.image_origin(index);
        image::imageops::replace(&mut canvas, panel, i64::from(left), i64::from(top));
    }

    render_png(path, size, canvas.into_raw(), |root| {
        for (index, lines) in caption_lines.iter().enumerate() {
            let centre = layout.column_left(index) + layout.column_width / 2;
            for (line_index, line) in lines.iter().enumerate() {
                let top = layout.caption_top() + line_index as u32 * STRIP_LINE_HEIGHT;
                // ab_glyph draws ascenders slightly above the anchor; +3 keeps them off the image.
                root.draw_text(line, &caption_style, (centre as i32, top as i32 + 3)).map_err(drawing_error)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A fresh directory for one test, removed (best effort) when dropped.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("pandaguard-charts-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn load(path: &Path) -> RgbImage {
        image::open(path).unwrap().to_rgb8()
    }

    fn distinct_colours(image: &RgbImage) -> usize {
        image.pixels().map(|pixel| pixel.0).collect::<HashSet<_>>().len()
    }

    fn has_colour(image: &RgbImage, colour: RGBColor) -> bool {
        image.pixels().any(|pixel| pixel.0 == [colour.0, colour.1, colour.2])
    }

    /// Text was really rendered: some dark pixels in the given rows (the title band).
    fn has_dark_pixels_in_rows(image: &RgbImage, rows: std::ops::Range<u32>) -> bool {
        rows.flat_map(|y| (0..image.width()).map(move |x| (x, y)))
            .any(|(x, y)| image.get_pixel(x, y).0.iter().all(|&channel| channel < 100))
    }

    fn uniform_image(width: usize, height: usize, value: f32) -> ModelImage {
        ModelImage { width, height, data: vec![value; 3 * width * height] }
    }

    #[test]
    fn certified_accuracy_chart_draws_curves_and_text() {
        let dir = TestDir::new("certified");
        let path = dir.file("certified.png");
        let curves = vec![
            Curve {
                label: "σ = 0.25".into(),
                points: vec![(0.0, 0.8), (0.25, 0.7), (0.5, 0.55), (0.75, 0.3), (1.0, 0.0)],
            },
            // Unsorted and with a NaN: must still draw.
            Curve { label: "σ = 0.50".into(), points: vec![(1.5, 0.1), (0.0, 0.6), (f64::NAN, 0.2), (0.75, 0.4)] },
        ];
        certified_accuracy_chart(&path, "Certified accuracy (randomized smoothing)", &curves).unwrap();
        let image = load(&path);
        assert_eq!(image.dimensions(), CHART_SIZE);
        assert!(distinct_colours(&image) > 20, "expected lines and anti-aliased text");
        assert!(has_colour(&image, SERIES_COLOURS[0]) && has_colour(&image, SERIES_COLOURS[1]));
        assert!(has_dark_pixels_in_rows(&image, 0..TITLE_BAND_HEIGHT), "title missing");
    }

    #[test]
    fn certified_accuracy_chart_without_curves_is_still_a_chart() {
        let dir = TestDir::new("certified-empty");
        let path = dir.file("empty.png");
        certified_accuracy_chart(&path, "No data", &[]).unwrap();
        let image = load(&path);
        assert_eq!(image.dimensions(), CHART_SIZE);
        assert!(distinct_colours(&image) > 5);
        // Curves without points count as no data too.
        certified_accuracy_chart(&path, "No points", &[Curve { label: "σ = 1".into(), points: vec![] }]).unwrap();
        assert_eq!(load(&path).dimensions(), CHART_SIZE);
    }

    #[test]
    fn accuracy_bars_chart_draws_one_colour_per_series() {
        let dir = TestDir::new("bars");
        let path = dir.file("bars.png");
        let groups = vec![
            AccuracyBars {
                group: "none".into(),
                bars: vec![("clean".into(), 0.95), ("transfer 4/255".into(), 0.1), ("adaptive 4/255".into(), 0.0)],
            },
            AccuracyBars {
                group: "default".into(),
                bars: vec![("clean".into(), 0.93), ("transfer 4/255".into(), 0.9), ("adaptive 4/255".into(), 0.4)],
            },
            // A missing series and an out-of-range value must not break the chart.
            AccuracyBars {
                group: "a preset with a rather long name indeed".into(),
                bars: vec![("clean".into(), 1.2), ("adaptive 4/255".into(), f64::NAN)],
            },
        ];
        accuracy_bars_chart(&path, "Accuracy by defense preset", &groups).unwrap();
        let image = load(&path);
        assert_eq!(image.dimensions(), CHART_SIZE);
        assert!(distinct_colours(&image) > 20);
        for colour in &SERIES_COLOURS[..3] {
            assert!(has_colour(&image, *colour), "series colour {colour:?} missing");
        }
        assert!(has_dark_pixels_in_rows(&image, 0..TITLE_BAND_HEIGHT), "title missing");
    }

    #[test]
    fn accuracy_bars_chart_without_groups_is_still_a_chart() {
        let dir = TestDir::new("bars-empty");
        let path = dir.file("empty.png");
        accuracy_bars_chart(&path, "No data", &[]).unwrap();
        let image = load(&path);
        assert_eq!(image.dimensions(), CHART_SIZE);
        assert!(distinct_colours(&image) > 5);
    }

    #[test]
    fn example_strip_shows_the_amplified_perturbation() {
        let dir = TestDir::new("strip");
        let path = dir.file("strip.png");
        let (width, height) = (64, 48);
        let original = uniform_image(width, height, 100.0 / 255.0);
        // +4/255 on the left half of every channel, nothing on the right half.
        let mut adversarial = original.clone();
        let plane = width * height;
        for channel in 0..3 {
            for y in 0..height {
                for x in 0..width / 2 {
                    adversarial.data[channel * plane + y * width + x] += 4.0 / 255.0;
                }
            }
        }
        let captions =
            ["original: bald eagle", "adversarial — raw: vulture / defended: bald eagle", "perturbation ×20, L∞ 4/255"];
        example_strip(&path, &original, &adversarial, 20.0, captions).unwrap();
        let image = load(&path);

        let layout = StripLayout {
            column_width: STRIP_MIN_COLUMN_WIDTH,
            image_width: width as u32,
            image_height: height as u32,
            caption_lines: 0,
        };
        assert_eq!(image.width(), layout.size().0);
        assert!(image.height() > layout.size().1, "caption rows missing");
        assert!(distinct_colours(&image) > 10);

        let (left, top) = layout.image_origin(2);
        // 0.5 + 20 · 4/255 ≈ 0.814 → 207.5 in 8 bits; unchanged pixels stay mid-grey.
        let perturbed = image.get_pixel(left + 5, top + 5).0;
        let unchanged = image.get_pixel(left + width as u32 - 5, top + 5).0;
        for channel in 0..3 {
            assert!((f32::from(perturbed[channel]) - 207.5).abs() <= 1.0, "perturbed pixel {perturbed:?}");
            assert!((f32::from(unchanged[channel]) - 127.5).abs() <= 1.0, "unchanged pixel {unchanged:?}");
        }
        // The original and adversarial panels are shown as they are.
        let (left, top) = layout.image_origin(0);
        assert_eq!(image.get_pixel(left + 5, top + 5).0, [100, 100, 100]);
        let (left, top) = layout.image_origin(1);
        assert_eq!(image.get_pixel(left + 5, top + 5).0, [104, 104, 104]);
        // Captions are dark text under the panels.
        assert!(has_dark_pixels_in_rows(&image, layout.caption_top()..image.height()));
    }

    #[test]
    fn example_strip_clips_the_amplified_perturbation() {
        let dir = TestDir::new("strip-clip");
        let path = dir.file("strip.png");
        let original = uniform_image(8, 8, 0.5);
        let adversarial = uniform_image(8, 8, 0.6);
        example_strip(&path, &original, &adversarial, 100.0, ["a", "b", "c"]).unwrap();
        let layout =
            StripLayout { column_width: STRIP_MIN_COLUMN_WIDTH, image_width: 8, image_height: 8, caption_lines: 0 };
        let (left, top) = layout.image_origin(2);
        assert_eq!(load(&path).get_pixel(left + 3, top + 3).0, [255, 255, 255]);
    }

    #[test]
    fn example_strip_rejects_images_of_different_sizes() {
        let dir = TestDir::new("strip-mismatch");
        let path = dir.file("strip.png");
        let error =
            example_strip(&path, &uniform_image(8, 8, 0.5), &uniform_image(8, 6, 0.5), 20.0, ["", "", ""]).unwrap_err();
        assert_eq!(
            error,
            ChartError::SizeMismatch {
                original_width: 8,
                original_height: 8,
                adversarial_width: 8,
                adversarial_height: 6
            }
        );
        assert!(error.to_string().contains("8×6"));
        assert!(!path.exists(), "no file on error");
    }

    #[test]
    fn example_strip_rejects_malformed_input() {
        let dir = TestDir::new("strip-malformed");
        let path = dir.file("strip.png");
        let mut short = uniform_image(8, 8, 0.5);
        short.data.pop();
        let good = uniform_image(8, 8, 0.5);
        let empty = uniform_image(0, 0, 0.5);
        let blank = ["", "", ""];
        assert!(matches!(example_strip(&path, &short, &good, 20.0, blank), Err(ChartError::InvalidInput(_))));
        assert!(matches!(example_strip(&path, &good, &short, 20.0, blank), Err(ChartError::InvalidInput(_))));
        assert!(matches!(example_strip(&path, &empty, &empty, 20.0, blank), Err(ChartError::InvalidInput(_))));
        assert!(matches!(example_strip(&path, &good, &good, f32::NAN, blank), Err(ChartError::InvalidInput(_))));
    }

    #[test]
    fn unwritable_path_is_an_error_not_a_panic() {
        let dir = TestDir::new("unwritable");
        let path = dir.file("missing-subdir").join("chart.png");
        let error = accuracy_bars_chart(&path, "t", &[]).unwrap_err();
        assert!(matches!(error, ChartError::Write { .. }), "{error:?}");
    }

    #[test]
    fn font_search_prefers_env_then_venv_then_system() {
        let dir = TestDir::new("font-search");
        let font = dir.0.join(".venv/lib/python3.11").join(MATPLOTLIB_FONT);
        std::fs::create_dir_all(font.parent().unwrap()).unwrap();
        std::fs::write(&font, b"not really a font").unwrap();
        let system = dir.file("system.ttf");
        std::fs::write(&system, b"also not a font").unwrap();
        let roots = vec![dir.file("elsewhere"), dir.0.clone()];

        assert_eq!(find_font(None, &roots, &[system.as_path()]).unwrap(), font);
        assert_eq!(find_font(Some(&system), &roots, &[]).unwrap(), system);
        assert_eq!(find_font(None, &[dir.file("elsewhere")], &[system.as_path()]).unwrap(), system);
    }

    #[test]
    fn font_search_failures_say_what_to_do() {
        let dir = TestDir::new("font-missing");
        let missing = dir.file("missing.ttf");
        let error = find_font(Some(&missing), std::slice::from_ref(&dir.0), &[]).unwrap_err();
        assert!(error.to_string().contains(FONT_ENV), "{error}");

        let error = find_font(None, std::slice::from_ref(&dir.0), &[missing.as_path()]).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, ChartError::Font(_)));
        assert!(message.contains(FONT_ENV) && message.contains("missing.ttf"), "{message}");
    }

    #[test]
    fn long_text_is_shortened_and_wrapped_to_fit() {
        ensure_font().unwrap();
        let style = text_style(CAPTION_FONT_SIZE, TEXT_COLOUR);
        let short = fit_text(&style, "a preset with a rather long name indeed", 80).unwrap();
        assert!(short.ends_with('…') && text_width(&style, &short).unwrap() <= 80, "{short}");
        let lines = wrap_text(&style, "adversarial — raw: vulture / defended: bald eagle", 150).unwrap();
        assert!(lines.len() >= 2, "{lines:?}");
        assert!(lines.iter().all(|line| text_width(&style, line).unwrap() <= 150), "{lines:?}");
        assert!(wrap_text(&style, "", 150).unwrap().is_empty());
    }
}

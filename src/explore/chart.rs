//! The decision map as a PNG: raw beside defended on the same axes, each cell coloured
//! by its label (hatched grey where the defense abstains), the line where the image's
//! own label has probability 0.5, the image (a ring at the origin) and the adversarial
//! example (a cross).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::run::{DecisionMap, SideMap};
use crate::model::Labels;
use crate::redteam::charts::{
    Area, ChartError, MUTED_TEXT_COLOUR, TEXT_COLOUR, draw_title, drawing_error, fit_text, render_png, text_style,
    white_pixels,
};

const SIZE: (u32, u32) = (1400, 860);
const PANEL: i32 = 560;
const ABSTAIN: RGBColor = RGBColor(185, 190, 199);

/// A colour per class: hues spread by the golden angle, so neighbouring ids differ.
pub fn class_colour(class_id: usize) -> RGBColor {
    let hue = (class_id as f64 * 137.508) % 360.0;
    let lightness = 0.44 + ((class_id / 3) % 3) as f64 * 0.07;
    let rgb = HSLColor(hue / 360.0, 0.62, lightness).to_backend_color().rgb;
    RGBColor(rgb.0, rgb.1, rgb.2)
}

/// Writes `map` to `path` as PNG; `labels` name the classes.
pub fn draw_map(map: &DecisionMap, labels: &Labels, path: &Path) -> Result<(), ChartError> {
    if map.raw.labels.len() != map.grid * map.grid || map.defended.labels.len() != map.grid * map.grid {
        return Err(ChartError::InvalidInput("the map does not have grid x grid cells".into()));
    }
    render_png(path, SIZE, white_pixels(SIZE), |root| {
        let title = format!(
            "Decision map: {} on {} · raw | defended ({}), {}x{} cells",
            labels.name(map.true_class),
            map.model,
            map.preset,
            map.grid,
            map.grid
        );
        let body = draw_title(root, &title)?;
        let left = 70;
        let top = 40;
        draw_panel(&body, map, &map.raw, "Raw", (left, top))?;
        draw_panel(&body, map, &map.defended, &format!("Defended ({})", map.preset), (left + PANEL + 110, top))?;
        draw_legend(&body, map, labels, top + PANEL + 70)
    })
}

fn draw_panel(
    area: &Area,
    map: &DecisionMap,
    side: &SideMap,
    name: &str,
    origin: (i32, i32),
) -> Result<(), ChartError> {
    let n = map.grid as i32;
    let cell = PANEL as f64 / n as f64;
    let (ox, oy) = origin;
    // Cell (i, j): row i from the bottom, column j from the left.
    let corner =
        |i: i32, j: i32| (ox + (j as f64 * cell).round() as i32, oy + PANEL - (i as f64 * cell).round() as i32);
    for i in 0..n {
        for j in 0..n {
            let label = side.labels[(i * n + j) as usize];
            let colour = label.map_or(ABSTAIN, class_colour);
            let (x0, y1) = corner(i, j);
            let (x1, y0) = corner(i + 1, j + 1);
            area.draw(&Rectangle::new([(x0, y0), (x1, y1)], colour.filled())).map_err(drawing_error)?;
            if label.is_none() {
                area.draw(&PathElement::new(vec![(x0, y1), (x1, y0)], RGBColor(138, 144, 155).stroke_width(1)))
                    .map_err(drawing_error)?;
            }
        }
    }
    // The 0.5 contour of the image's own label, between cell centres.
    let centre =
        |gi: f64, gj: f64| (ox + ((gj + 0.5) * cell).round() as i32, oy + PANEL - ((gi + 0.5) * cell).round() as i32);
    for segment in contour(&side.true_probability, map.grid, 0.5) {
        let points = vec![centre(segment.0.1, segment.0.0), centre(segment.1.1, segment.1.0)];
        area.draw(&PathElement::new(points.clone(), BLACK.mix(0.6).stroke_width(4))).map_err(drawing_error)?;
        area.draw(&PathElement::new(points, WHITE.stroke_width(2))).map_err(drawing_error)?;
    }
    area.draw(&Rectangle::new([(ox, oy), (ox + PANEL, oy + PANEL)], TEXT_COLOUR.stroke_width(1)))
        .map_err(drawing_error)?;

    // Axes in L2 units (ticks at -R, 0, R) with their L∞ equivalents.
    let r = map.radius_l2;
    let to_px = |x: f32| ox as f64 + ((x + r) / (2.0 * r)) as f64 * PANEL as f64;
    let to_py = |y: f32| (oy + PANEL) as f64 - ((y + r) / (2.0 * r)) as f64 * PANEL as f64;
    let ticks = text_style(15.0, TEXT_COLOUR).pos(Pos::new(HPos::Center, VPos::Top));
    let side_ticks = text_style(15.0, TEXT_COLOUR).pos(Pos::new(HPos::Right, VPos::Center));
    for value in [-r, 0.0, r] {
        let x = to_px(value) as i32;
        area.draw_text(&tick(value), &ticks, (x, oy + PANEL + 6)).map_err(drawing_error)?;
        let y = to_py(value) as i32;
        area.draw_text(&tick(value), &side_ticks, (ox - 6, y)).map_err(drawing_error)?;
    }
    let caption = text_style(16.0, TEXT_COLOUR).pos(Pos::new(HPos::Center, VPos::Top));
    let x_name = match map.x_direction {
        super::Direction::TowardAdversarial => "toward the adversarial example",
        _ => "a random direction",
    };
    let x_caption = format!("x: {x_name} (L2; ±{} = ±{} L∞)", tick(r), tick(map.radius_linf));
    let x_caption = fit_text(&caption, &x_caption, PANEL as u32)?;
    area.draw_text(&x_caption, &caption, (ox + PANEL / 2, oy + PANEL + 26)).map_err(drawing_error)?;
    let y_caption =
        text_style(16.0, TEXT_COLOUR).transform(FontTransform::Rotate270).pos(Pos::new(HPos::Center, VPos::Bottom));
    let y_text = format!("y: random, orthogonal (L2; ±{} = ±{} L∞)", tick(r), tick(r * map.linf_per_unit.1));
    area.draw_text(&y_text, &y_caption, (ox - 44, oy + PANEL / 2)).map_err(drawing_error)?;
    let heading = text_style(20.0, TEXT_COLOUR).pos(Pos::new(HPos::Center, VPos::Bottom));
    area.draw_text(name, &heading, (ox + PANEL / 2, oy - 6)).map_err(drawing_error)?;

    // The image at the origin, the adversarial example on the x axis.
    let (cx, cy) = (to_px(0.0) as i32, to_py(0.0) as i32);
    area.draw(&Circle::new((cx, cy), 9, WHITE.stroke_width(5))).map_err(drawing_error)?;
    area.draw(&Circle::new((cx, cy), 9, BLACK.stroke_width(2))).map_err(drawing_error)?;
    if let Some((x, _)) = map.adversarial.filter(|(x, _)| x.abs() <= r * 1.05) {
        let (px, py) = (to_px(x) as i32, cy);
        for (colour, width) in [(BLACK, 6), (WHITE, 3)] {
            area.draw(&PathElement::new(vec![(px - 8, py - 8), (px + 8, py + 8)], colour.stroke_width(width)))
                .map_err(drawing_error)?;
            area.draw(&PathElement::new(vec![(px + 8, py - 8), (px - 8, py + 8)], colour.stroke_width(width)))
                .map_err(drawing_error)?;
        }
    }
    Ok(())
}

fn draw_legend(area: &Area, map: &DecisionMap, labels: &Labels, top: i32) -> Result<(), ChartError> {
    let style = text_style(15.0, TEXT_COLOUR).pos(Pos::new(HPos::Left, VPos::Center));
    let muted = text_style(14.0, MUTED_TEXT_COLOUR).pos(Pos::new(HPos::Left, VPos::Center));
    let mut entries: Vec<(String, RGBColor)> = map
        .classes()
        .into_iter()
        .take(8)
        .map(|c| {
            let own = if c == map.true_class { " (the image's label)" } else { "" };
            (format!("{}{own}", labels.name(c)), class_colour(c))
        })
        .collect();
    if map.defended.labels.iter().any(Option::is_none) {
        entries.push(("abstained".into(), ABSTAIN));
    }
    let (mut x, mut y) = (70, top);
    for (text, colour) in entries {
        let text = fit_text(&style, &text, 300)?;
        area.draw(&Rectangle::new([(x, y - 8), (x + 16, y + 8)], colour.filled())).map_err(drawing_error)?;
        area.draw_text(&text, &style, (x + 22, y)).map_err(drawing_error)?;
        x += 330;
        if x > 1100 {
            x = 70;
            y += 26;
        }
    }
    let note = format!(
        "White line: p(the image's label) = 0.5. Ring: the image; cross: the adversarial example. \
         Same seed for every cell; {} model rows in {:.1} s.",
        map.rows,
        map.elapsed.as_secs_f64()
    );
    area.draw_text(&note, &muted, (70, y + 30)).map_err(drawing_error)
}

fn tick(value: f32) -> String {
    let rounded = format!("{value:.3}");
    rounded.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A line segment in cell units: ((x1, y1), (x2, y2)).
pub type Segment = ((f64, f64), (f64, f64));

/// Marching squares over the grid of values (row-major, row i from the bottom): the
/// segments where the values cross `level`, as ((x1, y1), (x2, y2)) in cell units.
/// Cells with a missing corner are skipped.
pub fn contour(values: &[Option<f32>], n: usize, level: f32) -> Vec<Segment> {
    let mut segments = Vec::new();
    let at = |i: usize, j: usize| values.get(i * n + j).copied().flatten();
    let lerp = |a: f32, b: f32| if (b - a).abs() < 1e-12 { 0.5 } else { f64::from((level - a) / (b - a)) };
    for i in 0..n.saturating_sub(1) {
        for j in 0..n.saturating_sub(1) {
            let (Some(a), Some(b), Some(c), Some(d)) = (at(i, j), at(i, j + 1), at(i + 1, j + 1), at(i + 1, j)) else {
                continue;
            };
            let (fi, fj) = (i as f64, j as f64);
            let bottom = (fj + lerp(a, b), fi);
            let right = (fj + 1.0, fi + lerp(b, c));
            let top = (fj + lerp(d, c), fi + 1.0);
            let left = (fj, fi + lerp(a, d));
            let index = usize::from(a >= level)
                | usize::from(b >= level) << 1
                | usize::from(c >= level) << 2
                | usize::from(d >= level) << 3;
            let pairs: &[Segment] = match index {
                1 | 14 => &[(left, bottom)],
                2 | 13 => &[(bottom, right)],
                3 | 12 => &[(left, right)],
                4 | 11 => &[(right, top)],
                6 | 9 => &[(bottom, top)],
                7 | 8 => &[(left, top)],
                5 => &[(left, top), (bottom, right)],
                10 => &[(left, bottom), (right, top)],
                _ => &[],
            };
            segments.extend_from_slice(pairs);
        }
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contour_of_a_ramp_is_a_straight_line_where_it_crosses_the_level() {
        // Values rise with the column: 0.0, 0.25, 0.5, 0.75, 1.0 → the 0.5 line at column 2.
        let n = 5;
        let values: Vec<Option<f32>> = (0..n * n).map(|k| Some((k % n) as f32 / 4.0)).collect();
        let segments = contour(&values, n, 0.6);
        assert_eq!(segments.len(), n - 1);
        for ((x1, _), (x2, _)) in segments {
            assert!((x1 - 2.4).abs() < 1e-6 && (x2 - 2.4).abs() < 1e-6);
        }
    }
}

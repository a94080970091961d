//! The host-side geometry of the Qwen-VL vision towers: where each patch sits, how patches are
//! grouped into attention windows, and how the learned position table is interpolated onto a
//! grid (transformers' `vision_utils.py`: `get_vision_position_ids`, `get_vision_window_index`,
//! the bilinear interpolation taps). Patches arrive in the processor's merge-block order: for each
//! temporal patch, for each `merge x merge` block (row-major), its patches row-major.

/// The patch grid of one image or video: `t` temporal patches of `h x w` patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisualGrid {
    /// Temporal patches (1 for an image).
    pub t: usize,
    /// Patch rows.
    pub h: usize,
    /// Patch columns.
    pub w: usize,
}

impl VisualGrid {
    /// Patches in the grid.
    pub fn patches(&self) -> usize {
        self.t * self.h * self.w
    }
}

/// The (row, column) of every patch, in merge-block order, repeated for each temporal patch.
pub fn position_ids(grids: &[VisualGrid], merge: usize) -> Vec<[usize; 2]> {
    let mut ids = Vec::with_capacity(grids.iter().map(VisualGrid::patches).sum());
    for grid in grids {
        let frame: Vec<[usize; 2]> = merge_block_order(grid.h, grid.w, merge).collect();
        for _ in 0..grid.t {
            ids.extend_from_slice(&frame);
        }
    }
    ids
}

/// (row, column) of an `h x w` grid's patches in merge-block order.
fn merge_block_order(h: usize, w: usize, merge: usize) -> impl Iterator<Item = [usize; 2]> {
    let (blocks_h, blocks_w) = (h / merge, w / merge);
    (0..blocks_h).flat_map(move |bh| {
        (0..blocks_w).flat_map(move |bw| {
            (0..merge).flat_map(move |mh| (0..merge).map(move |mw| [bh * merge + mh, bw * merge + mw]))
        })
    })
}

/// Patches per frame, one segment per temporal patch of every grid: what full attention
/// attends within (frames of a video do not see each other, nor do images).
pub fn frame_segments(grids: &[VisualGrid]) -> Vec<usize> {
    grids.iter().flat_map(|grid| std::iter::repeat_n(grid.h * grid.w, grid.t)).collect()
}

/// Qwen2.5-VL's attention windows: the order of the merged tokens (groups of `merge^2`
/// patches) once grouped window by window, and the windows' lengths in patches (empty windows
/// left out). `window_size` is in pixels.
pub fn window_index(grids: &[VisualGrid], merge: usize, window_size: usize, patch: usize) -> (Vec<usize>, Vec<usize>) {
    let side = (window_size / merge / patch).max(1); // merged tokens per window side
    let mut order = Vec::new();
    let mut lengths = Vec::new();
    let mut offset = 0;
    for grid in grids {
        let (rows, cols) = (grid.h / merge, grid.w / merge);
        // A full extra window when the grid divides evenly: transformers pads `side - n % side`.
        let (windows_h, windows_w) = ((rows + side - rows % side) / side, (cols + side - cols % side) / side);
        for t in 0..grid.t {
            for wh in 0..windows_h {
                for ww in 0..windows_w {
                    let mut count = 0;
                    for r in wh * side..((wh + 1) * side).min(rows) {
                        for c in ww * side..((ww + 1) * side).min(cols) {
                            order.push(offset + (t * rows + r) * cols + c);
                            count += 1;
                        }
                    }
                    if count > 0 {
                        lengths.push(count * merge * merge);
                    }
                }
            }
        }
        offset += grid.t * rows * cols;
    }
    (order, lengths)
}

/// The inverse of a permutation.
pub fn inverse(order: &[usize]) -> Vec<usize> {
    let mut inverse = vec![0; order.len()];
    for (position, &index) in order.iter().enumerate() {
        inverse[index] = position;
    }
    inverse
}

/// Qwen3-VL's learned position table (`side x side` entries) bilinearly interpolated onto each
/// grid with corners aligned: per patch (merge-block order, every frame), four table rows and
/// their weights, in the order (top-left, top-right, bottom-left, bottom-right).
pub fn interpolation_taps(grids: &[VisualGrid], side: usize, merge: usize) -> (Vec<[usize; 4]>, Vec<[f32; 4]>) {
    // Per axis: the two table indices and weights of position `index` of `size` (f32, as torch).
    let axis = |index: usize, size: usize| -> ([usize; 2], [f32; 2]) {
        let source = index as f32 * (side - 1) as f32 / (size.max(2) - 1) as f32;
        let floor = source.floor();
        let frac = source - floor;
        let low = (floor as usize).min(side - 1);
        let high = (floor as usize + 1).min(side - 1);
        ([low, high], [(1.0 - frac).max(0.0), frac.max(0.0)])
    };
    let mut indices = Vec::new();
    let mut weights = Vec::new();
    for grid in grids {
        let frame: Vec<([usize; 4], [f32; 4])> = merge_block_order(grid.h, grid.w, merge)
            .map(|[row, col]| {
                let (rows, row_weights) = axis(row, grid.h);
                let (cols, col_weights) = axis(col, grid.w);
                let taps = [
                    rows[0] * side + cols[0],
                    rows[0] * side + cols[1],
                    rows[1] * side + cols[0],
                    rows[1] * side + cols[1],
                ];
                let weights = [
                    row_weights[0] * col_weights[0],
                    row_weights[0] * col_weights[1],
                    row_weights[1] * col_weights[0],
                    row_weights[1] * col_weights[1],
                ];
                (taps, weights)
            })
            .collect();
        for _ in 0..grid.t {
            for (taps, w) in &frame {
                indices.push(*taps);
                weights.push(*w);
            }
        }
    }
    (indices, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(t: usize, h: usize, w: usize) -> VisualGrid {
        VisualGrid { t, h, w }
    }

    #[test]
    fn position_ids_follow_merge_blocks() {
        let ids = position_ids(&[grid(1, 4, 4)], 2);
        let expected = [
            [0, 0],
            [0, 1],
            [1, 0],
            [1, 1],
            [0, 2],
            [0, 3],
            [1, 2],
            [1, 3],
            [2, 0],
            [2, 1],
            [3, 0],
            [3, 1],
            [2, 2],
            [2, 3],
            [3, 2],
            [3, 3],
        ];
        assert_eq!(ids, expected);
        assert_eq!(position_ids(&[grid(2, 2, 2)], 2).len(), 8);
    }

    #[test]
    fn windows_match_transformers_examples() {
        // spec examples: patch 14, merge 2, window 56 (2x2 merged tokens per window).
        let (order, lengths) = window_index(&[grid(1, 6, 10)], 2, 56, 14);
        assert_eq!(order, [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]);
        let cu: Vec<usize> = lengths
            .iter()
            .scan(0, |sum, l| {
                *sum += l;
                Some(*sum)
            })
            .collect();
        assert_eq!(cu, [16, 32, 40, 48, 56, 60]);
        let (order, lengths) = window_index(&[grid(1, 4, 4), grid(2, 4, 6)], 2, 56, 14);
        assert_eq!(order, [0, 1, 2, 3, 4, 5, 7, 8, 6, 9, 10, 11, 13, 14, 12, 15]);
        let cu: Vec<usize> = lengths
            .iter()
            .scan(0, |sum, l| {
                *sum += l;
                Some(*sum)
            })
            .collect();
        assert_eq!(cu, [16, 32, 40, 56, 64]);
        assert_eq!(frame_segments(&[grid(1, 4, 4), grid(2, 4, 6)]), [16, 24, 24]);
        assert_eq!(inverse(&[2, 0, 1]), [1, 2, 0]);
    }

    #[test]
    fn interpolation_taps_match_transformers_example() {
        // spec example: side 4, grid (1, 2, 6).
        let (indices, weights) = interpolation_taps(&[grid(1, 2, 6)], 4, 2);
        assert_eq!(indices[..5], [[0, 1, 4, 5], [0, 1, 4, 5], [12, 13, 12, 13], [12, 13, 12, 13], [1, 2, 5, 6]]);
        let close = |a: [f32; 4], b: [f32; 4]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(weights[0], [1.0, 0.0, 0.0, 0.0]));
        assert!(close(weights[1], [0.4, 0.6, 0.0, 0.0]), "{:?}", weights[1]);
        assert!(close(weights[4], [0.8, 0.2, 0.0, 0.0]), "{:?}", weights[4]);
    }
}

//! InternVL's dynamic tiling: pick the grid whose aspect ratio is closest to the image's, resize
//! the image to fill it, cut row-major tiles, append a thumbnail (transformers'
//! `models/got_ocr2/image_processing_got_ocr2.py`: `get_optimal_tiled_canvas`,
//! `crop_image_to_patches`; OpenGVLab's `dynamic_preprocess`).

use image::RgbImage;

use super::image::{crop, resize};

/// How images are cut into tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TilingConfig {
    /// Side of a square tile in pixels (the vision tower's input size).
    pub tile_size: u32,
    /// Whether to tile at all; without, the whole image is resized to one tile.
    pub dynamic: bool,
    /// Fewest tiles of a grid.
    pub min_tiles: usize,
    /// Most tiles of a grid (the thumbnail is not counted).
    pub max_tiles: usize,
    /// Append the whole image as one more tile when the grid has more than one.
    pub use_thumbnail: bool,
}

/// A grid of tiles: `cols` across, `rows` down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    /// Tiles across.
    pub cols: usize,
    /// Tiles down.
    pub rows: usize,
}

impl Grid {
    /// Tiles in the grid.
    pub fn tiles(self) -> usize {
        self.cols * self.rows
    }
}

/// The most tiles per image a checkpoint or a call may ask for (InternVL uses up to 12; 40 in some
/// evaluations): bounds the grid search and the memory of one image.
pub const MAX_TILES: usize = 256;

/// Every grid with `min <= cols * rows <= max`, ordered by tile count (stable, columns outer).
pub fn candidate_grids(min_tiles: usize, max_tiles: usize) -> Vec<Grid> {
    let mut grids: Vec<Grid> = (1..=max_tiles)
        .flat_map(|cols| (1..=max_tiles).map(move |rows| Grid { cols, rows }))
        .filter(|grid| (min_tiles..=max_tiles).contains(&grid.tiles()))
        .collect();
    grids.sort_by_key(|grid| grid.tiles());
    grids
}

/// The grid whose `cols / rows` is closest to `width / height`. On a tie the later (larger) grid
/// wins while the image's area exceeds half the area the larger grid would cover.
pub fn best_grid(width: u32, height: u32, config: &TilingConfig) -> Grid {
    let aspect = f64::from(width) / f64::from(height);
    let area = f64::from(width) * f64::from(height);
    let tile_area = f64::from(config.tile_size) * f64::from(config.tile_size);
    let mut best = Grid { cols: 1, rows: 1 };
    let mut best_diff = f64::INFINITY;
    for grid in candidate_grids(config.min_tiles, config.max_tiles) {
        let diff = (aspect - grid.cols as f64 / grid.rows as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = grid;
        } else if diff == best_diff && area > 0.5 * tile_area * grid.tiles() as f64 {
            best = grid;
        }
    }
    best
}

/// The grid an image of this size is cut into, and its number of tiles (thumbnail included),
/// known before any pixel is touched.
pub fn tile_layout(width: u32, height: u32, config: &TilingConfig) -> (Grid, usize) {
    if !config.dynamic {
        return (Grid { cols: 1, rows: 1 }, 1);
    }
    let grid = best_grid(width, height, config);
    let thumbnail = usize::from(config.use_thumbnail && grid.tiles() > 1);
    (grid, grid.tiles() + thumbnail)
}

/// Cuts an image into tiles of `tile_size`: the grid's tiles row by row, then the thumbnail.
pub fn split_into_tiles(image: &RgbImage, config: &TilingConfig) -> (Grid, Vec<RgbImage>) {
    let size = config.tile_size;
    if !config.dynamic {
        return (Grid { cols: 1, rows: 1 }, vec![resize(image, size, size)]);
    }
    let grid = best_grid(image.width(), image.height(), config);
    let canvas = resize(image, size * grid.cols as u32, size * grid.rows as u32);
    let mut tiles: Vec<RgbImage> = (0..grid.tiles())
        .map(|i| crop(&canvas, (i % grid.cols) as u32 * size, (i / grid.cols) as u32 * size, size))
        .collect();
    if config.use_thumbnail && tiles.len() > 1 {
        tiles.push(resize(image, size, size));
    }
    (grid, tiles)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_tiles: usize) -> TilingConfig {
        TilingConfig { tile_size: 448, dynamic: true, min_tiles: 1, max_tiles, use_thumbnail: true }
    }

    #[test]
    fn candidates_are_ordered_by_tile_count_columns_first() {
        let grids: Vec<(usize, usize)> = candidate_grids(1, 4).into_iter().map(|g| (g.cols, g.rows)).collect();
        assert_eq!(grids, vec![(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]);
    }

    #[test]
    fn best_grid_prefers_larger_grid_on_ratio_tie_for_big_images() {
        // 2:1 and 4:2 have the same ratio; a large image takes the larger grid...
        assert_eq!(best_grid(1792, 896, &config(12)), Grid { cols: 4, rows: 2 });
        // ...a small one keeps the smaller grid.
        assert_eq!(best_grid(200, 100, &config(12)), Grid { cols: 2, rows: 1 });
    }

    #[test]
    fn single_tile_images_get_no_thumbnail() {
        let image = RgbImage::new(10, 10);
        let (grid, tiles) = split_into_tiles(&image, &TilingConfig { tile_size: 14, ..config(6) });
        assert_eq!((grid.tiles(), tiles.len()), (1, 1));
        let wide = RgbImage::new(30, 10);
        let (grid, tiles) = split_into_tiles(&wide, &TilingConfig { tile_size: 14, ..config(6) });
        assert_eq!((grid, tiles.len()), (Grid { cols: 3, rows: 1 }, 4));
    }
}

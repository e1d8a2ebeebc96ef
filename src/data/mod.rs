//! Datasets on disk: the MVTec AD layout (`train/good`, `test/<type>`, `ground_truth/<type>`)
//! and plain folders of images; everything unreadable is reported with its path.

pub mod synth;
pub mod validation;

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"];

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())).unwrap_or(false)
}

/// Image files directly inside `dir`, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = vec![];
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if is_image(&p) {
            if p.is_file() {
                out.push(p);
            } else if p.is_symlink() {
                // a dangling or looping link named like an image is a mistake worth reporting
                let reason = std::fs::metadata(&p).err().map(|e| e.to_string()).unwrap_or_else(|| "not a file".into());
                return Err(Error::Dataset { path: p, reason: format!("broken link: {reason}") });
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Expands files and folders given on a command line into image files.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    for p in inputs {
        if p.is_dir() {
            out.extend(list_images(p)?);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(Error::io(p, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
        }
    }
    if out.is_empty() {
        return Err(Error::Dataset { path: inputs.first().cloned().unwrap_or_default(), reason: "no images found".into() });
    }
    Ok(out)
}

/// One test image with its label.
#[derive(Clone, Debug)]
pub struct TestSample {
    pub path: PathBuf,
    /// `good` or the defect type (folder name).
    pub defect: String,
    pub mask: Option<PathBuf>,
}

impl TestSample {
    pub fn is_defect(&self) -> bool {
        self.defect != "good"
    }
}

/// A category in MVTec AD layout.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub train: Vec<PathBuf>,
    pub test: Vec<TestSample>,
}

impl Dataset {
    /// Opens `<root>/train/good` and `<root>/test/*`; a missing test folder is allowed for training.
    pub fn open(root: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Dataset { path: root.to_path_buf(), reason };
        if !root.is_dir() {
            return Err(bad("not a folder".into()));
        }
        let train_dir = root.join("train").join("good");
        let train = if train_dir.is_dir() { list_images(&train_dir)? } else { vec![] };
        let mut test = vec![];
        let test_dir = root.join("test");
        if test_dir.is_dir() {
            let mut types: Vec<PathBuf> = std::fs::read_dir(&test_dir)
                .map_err(|e| Error::io(&test_dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            types.sort();
            for t in types {
                let defect = t.file_name().unwrap().to_string_lossy().into_owned();
                for path in list_images(&t)? {
                    let mask = if defect == "good" {
                        None
                    } else {
                        let stem = path.file_stem().unwrap().to_string_lossy();
                        let m = root.join("ground_truth").join(&defect).join(format!("{stem}_mask.png"));
                        m.is_file().then_some(m)
                    };
                    test.push(TestSample { path, defect: defect.clone(), mask });
                }
            }
        }
        if train.is_empty() && test.is_empty() {
            return Err(bad("neither train/good nor test/<type> holds images (expected MVTec AD layout)".into()));
        }
        Ok(Dataset { root: root.to_path_buf(), train, test })
    }

    pub fn require_train(&self) -> Result<()> {
        if self.train.is_empty() {
            return Err(Error::Dataset { path: self.root.clone(), reason: "train/good holds no images".into() });
        }
        Ok(())
    }

    pub fn require_test(&self) -> Result<()> {
        let good = self.test.iter().filter(|s| !s.is_defect()).count();
        if good == 0 || good == self.test.len() {
            return Err(Error::Dataset {
                path: self.root.clone(),
                reason: format!("test/ needs both good and defective images (found {good} good of {})", self.test.len()),
            });
        }
        Ok(())
    }
}

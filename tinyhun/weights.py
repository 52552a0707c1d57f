"""Reading a checkpoint folder's tensors, checked against the family's shape table, into structs.Weights.

Float tensors become float32 once (float32 ones stay memory-mapped); a matrix stored quantized (X.qweight, X.scales
[, X.mins] for INT4; X.q8weight, X.q8scales for INT8, written by `tinyhun quantize` or a GGUF import) becomes a
Q4Weight / Q8Weight. The family's `sanitize` turns them into the engine's named weights.
"""
from tqdm import tqdm

from .checkpoint import open_folder, to_float32
from .errors import TinyhunError
from .families import family_of
from .kernels import q4, q8

# present in some exports, never used by the forward pass
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
Q4_PARTS = ("qweight", "scales", "mins")   # an INT4 matrix X.weight is stored as X.qweight, X.scales[, X.mins]
Q8_PARTS = ("q8weight", "q8scales")         # an INT8 one as X.q8weight, X.q8scales


def check_names(files, cfg):
    """The family's shape table; tensors it does not call for are refused (a matrix may be stored quantized)."""
    shapes = family_of(cfg).checkpoint_shapes(cfg)
    allowed = set(shapes)
    if cfg.quantization:
        allowed |= {n[:-len("weight")] + part for n, shape in shapes.items() if len(shape) == 2
                    for part in Q4_PARTS + Q8_PARTS}
    for name in files:
        harmless = name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings)
        if name not in allowed and not harmless:
            raise TinyhunError(f"{files[name].path}: unexpected tensor '{name}' for this config")
    return shapes


def read_float(files, shapes, folder, name):
    """A float tensor of a checkpoint, checked against the shape table and converted to float32."""
    if name not in files:
        raise TinyhunError(f"{folder}: missing tensor '{name}'")
    f = files[name]
    got = f.shape(name)
    if got != shapes[name]:
        raise TinyhunError(f"{f.path}: tensor '{name}' has shape {list(got)}, expected {list(shapes[name])}")
    dtype = f.dtype(name)
    if dtype not in ("F32", "F16", "BF16", "F64"):
        raise TinyhunError(f"{f.path}: tensor '{name}' has dtype {dtype}, expected a float type")
    return to_float32(f.get(name), dtype)


def read_tensor(files, shapes, folder, cfg, name):
    """read_float, or for a matrix stored quantized its Q4Weight / Q8Weight (checked field by field)."""
    base = name[:-len("weight")]
    kind = next((k for k, part in (("q4", "qweight"), ("q8", "q8weight")) if base + part in files), None)
    if not cfg.quantization or kind is None or len(shapes[name]) != 2:
        return read_float(files, shapes, folder, name)
    n, k = shapes[name]
    if kind == "q4":
        parts = {p: files[base + p].get(base + p) for p in Q4_PARTS if base + p in files}
        meta = {**cfg.quantization, "n": n, "k": k, "sym": "mins" not in parts}
        make = q4.Q4Weight.from_arrays
    else:
        parts = {p: files[base + p].get(base + p) for p in Q8_PARTS if base + p in files}
        meta = {"format": q8.FORMAT, "version": q8.LAYOUT_VERSION, "n": n, "k": k}
        make = q8.Q8Weight.from_arrays
    try:
        return make(parts, meta)
    except TinyhunError as e:
        raise TinyhunError(f"{files[base + ('qweight' if kind == 'q4' else 'q8weight')].path}: "
                           f"tensor '{base}*': {e}") from None


def load_weights(folder, cfg, progress=True):
    """structs.Weights of a model folder: every tensor read, checked and laid out by the config's family."""
    files = open_folder(folder)
    shapes = check_names(files, cfg)
    bar = tqdm(total=len(shapes), desc="loading", unit="tensor", disable=not progress, leave=False)

    def read(name):
        bar.update()
        return read_tensor(files, shapes, folder, cfg, name)
    with bar:
        return family_of(cfg).sanitize(cfg, read)

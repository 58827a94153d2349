"""Default OAML training config: every knob, documented.

Usage:
    python train.py --config=configs/default.py --workdir=/tmp/run
    python train.py --config=configs/default.py:test --workdir=/tmp/run   # tiny, for tests and laptops

Any field can be overridden on the command line, e.g. `--config.train.batch_size=1024`.
"""

from typing import Optional

import ml_collections

def get_model_config() -> ml_collections.ConfigDict:
    """Model fields (checked and consumed by `oaml_jax.models.factory`)."""
    model = ml_collections.ConfigDict()
    # Backbone preset: ir_18, ir_34, ir_50, ir_100, ir_se_50, ir_se_100.
    model.arch = "ir_50"
    # Keyword overrides for `oaml_jax.models.build_backbone` (stage_sizes, widths, stem_width, use_se,
    # output_layer "flatten"|"gnap"|"gdc", embedding_size, dropout); empty = the preset's defaults.
    model.backbone = ml_collections.ConfigDict()
    # Backbone stage whose feature map feeds QAConv and the occlusion head: 4 -> 7x7, 3 -> 14x14.
    model.feature_stage = 4
    # Compute dtype of the backbone: "float32" or "bfloat16" (parameters always stay float32).
    model.dtype = "float32"
    # Channel order the network takes: "BGR" (AdaFace-compatible, the published weights) or "RGB". Faces
    # are always handed over as uint8 RGB; `oaml_jax.models.face_input` maps them on the device.
    model.input_channel_order = "BGR"
    # Number of identities; 0 = read from the training data.
    model.num_classes = 0
    # Margin head: "adaface" | "arcface" | "cosface".
    model.head = "adaface"
    # Head keyword arguments; keys the chosen head does not have are ignored with a warning
    # (ArcFace/CosFace have no h / t_alpha). AdaFace: margin m, norm-adaptivity h, scale s, EMA rate t_alpha.
    model.head_kwargs = ml_collections.ConfigDict(dict(m=0.4, h=0.333, s=64.0, t_alpha=0.01))
    # Loss weights: L = lam_ada * L_ada + lam_qa * L_qa + lam_occ * L_occ.
    model.lam_ada = 0.1
    model.lam_qa = 0.9
    model.lam_occ = 0.1
    # Occlusion loss: "mse" (the original's, on the sigmoid output) or "bce" (cross-entropy of the logits
    # with the visible fraction as soft target: its gradient does not vanish when the sigmoid saturates).
    model.occ_loss = "mse"
    # Switches: QAConv gradients reach the backbone; the occlusion head sees a detached feature map;
    # QAConv sees detached occlusion maps.
    model.qaconv_to_backbone = True
    model.detach_occ_input = True
    model.detach_qaconv_vis = True
    # QAConv matching group, in images: self-matching and its losses run inside groups of this many
    # consecutive images (a divisor of the per-device batch and a multiple of data.k); 0 = the whole batch.
    model.qaconv_group_size = 0
    # Memory bound of the QAConv matcher, MiB of float32 similarities per block of a group (the gallery is
    # matched block by block). Smaller saves memory, larger can be faster (timings: README, Performance).
    model.qaconv_block_mb = 256
    # Weight QAConv's similarities by the predicted occlusion maps (False = all-ones maps).
    model.qaconv_occlusion_weighting = True
    return model


def get_data_config() -> ml_collections.ConfigDict:
    """Data fields: the `data_cfg` of data_pipelines.pipeline.train_epoch_dataset."""
    data = ml_collections.ConfigDict()
    # "recordio" (faces_emore train.rec/.idx/property), "folder" (one folder per identity) or "tfds".
    data.source = "recordio"
    # Folder of the training data; validation .bin pair files are looked up in the same folder.
    data.path = "data/faces_emore"
    # Batch composition: "pk" (P identities x K images) or "graph" (a class and its P-1 nearest classes).
    data.sampler = "pk"
    data.k = 4
    # Grain worker processes; 0 = decode in the training process.
    data.num_workers = 0
    data.seed = 0
    # "raise": a corrupt record stops training naming it; "skip": replace it and count it.
    data.on_corrupt = "raise"
    # Classes per chunk of the k-NN class graph (memory bound of the chunked matmul).
    data.graph_chunk = 4096
    # AdaFace's augmenter: flip, then crop (RandomResizedCrop scale 0.2-1, padded back), low resolution and
    # photometric jitter, each with probability 0.2.
    data.augment = ml_collections.ConfigDict(dict(
        flip_prob=0.5, crop_prob=0.2, crop_scale=(0.2, 1.0), lowres_prob=0.2, photometric_prob=0.2))
    data.occlusion = ml_collections.ConfigDict(dict(
        prob_blocks=0.2, prob_mask=0.2, prob_sunglasses=0.1, prob_rgba=0.0, rgba_path="",
        blocks_count=(1, 3), blocks_size=(0.1, 0.4)))
    # OAML's second stream (data_pipelines/occlusion_sets.py): real occluded faces with drawn masks train
    # the occlusion head. Set folders (kept_faces/NAME.jpg + masks/NAME_mask.png, or .array_record files);
    # one path or a tuple; () = no occlusion stream.
    data.occlusion_sets = ml_collections.FieldReference((), field_type=object)
    # Global images per step of the occlusion batch (split over devices and processes like the main batch;
    # 0 = off). OAML: 32 set faces + 6 clean faces.
    data.occlusion_batch = 0
    # Share of the occlusion batch from the sets; the rest are clean training faces with all-visible
    # targets (no synthetic occluders), so the head does not learn "occluded everywhere".
    data.occlusion_real_share = 0.8
    # The sets hold 112x112 aligned faces (others are refused naming the file); False detects and aligns
    # them when opened and warps their masks by the same similarity (`oaml-inference align --masks` once,
    # offline, is the way for pods).
    data.occlusion_aligned = True
    # Share of each set held out (by a hash of the name) for validation of the head.
    data.occlusion_holdout = 0.1
    # Whether the main batch's synthetic occluders still train the occlusion head when a set is given.
    # True (default): pasted masks, sunglasses and blocks add many varied labels per step to a small real set.
    # False: the head learns from the real stream only; for large sets whose occluders (niqab, scarves,
    # helmets) look unlike the pasted ones.
    data.occlusion_synthetic_head = True
    # The occlusion stream's own light augmentation: flip (the mask flips with the face) and AdaFace's
    # brightness/contrast/saturation jitter (on the face only).
    data.occlusion_augment = ml_collections.ConfigDict(dict(flip_prob=0.5, photometric_prob=0.0))
    return data


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """Returns the training config.

    Args:
        arg: None for the full config; "test" for a tiny narrow model and a few steps (unit tests, CPU).
    """
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Directory of a converted AdaFace checkpoint (oaml_jax/convert.py) whose backbone initializes the
    # model; "" = random init. Ignored when resuming from a checkpoint in the workdir.
    config.init_from = ""

    config.model = get_model_config()
    config.data = get_data_config()

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "sgd"  # "sgd" | "adamw"
    # Peak learning rate for a global batch of 512 images; scaled linearly with the batch.
    config.optim.lr = 0.1
    config.optim.momentum = 0.9  # SGD momentum (AdamW: b1)
    # L2 weight decay on conv/dense kernels and the class kernel only (not BN, PReLU, biases).
    config.optim.weight_decay = 5e-4
    config.optim.schedule = "step"  # "step" | "cosine"
    config.optim.drop_epochs = (12, 20, 24)  # "step": multiply the lr by drop_factor at these epochs
    config.optim.drop_factor = 0.1
    config.optim.warmup_epochs = 0.0  # linear warmup from 0 (fractional epochs allowed)
    config.optim.grad_clip_norm = 0.0  # global-norm clipping; 0 = off

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 26
    config.train.batch_size = 512  # global, over all devices and processes
    # Stop after this many steps (preemption drills, smoke tests); 0 = epochs * steps_per_epoch. The lr
    # schedule still follows `epochs`, which also bound the run: more steps than they hold are cut (warned).
    config.train.max_steps = 0
    config.train.log_every = 100
    config.train.checkpoint_every = 2000
    config.train.keep = 3  # latest checkpoints kept (the best by validation is kept as well)
    config.train.eval_every = 5000  # validation on data.path/*.bin; 0 = only at the end; -1 = never
    # Non-finite loss or gradient: "stop" raises naming the step and the last good checkpoint; "skip"
    # keeps the previous state for that step and counts it in the metrics.
    config.train.nonfinite = "stop"
    # "skip" still stops once more than this share of the steps so far (at least 10 counted) were skipped.
    config.train.max_skipped_share = 0.1
    # Resuming a checkpoint whose config differs in a field that changes the model or the data order
    # (model.*, data sampling and augmentation, batch size, seed) is refused unless this is True.
    config.train.allow_config_change = False
    # Resuming on data other than the checkpoint's (identities added, removed or renamed) is refused unless
    # this is True; the class kernel is then kept as it is (row i trains class i of the new data).
    config.train.allow_data_change = False
    # Steps to trace with the profiler (clu Profile, written to the workdir); 0 = no trace.
    config.train.profile_steps = 0

    config.eval = ml_collections.ConfigDict()
    # The evaluators, by name, run in this order by eval.py (`oaml_jax.evaluation.evaluators`); those with
    # `validation=True` also by train-time validation (clean pairs). Types: "bin_pairs" (the .bin sets below),
    # "pairs_file" (pairs=<LFW-format pairs.txt>, images=<root>), "folder" (path=<identity folders>,
    # identity_pattern, aligned), "ijb" (eval.ijb_* below), 1:N "identification" (gallery, probe, aligned),
    # "tinyface" (root) and "ijb_1n" (root, default eval.ijb_root), "occlusion" (the occlusion head on
    # eval.occlusion_sets, else the held-out part of data.occlusion_sets; left out with neither). Add one with e.g.
    # `--config.eval.evaluators.niqab="dict(type='folder', path='/data/niqab')"` or eval.py's --folder.
    config.eval.evaluators = ml_collections.ConfigDict(dict(
        bins=dict(type="bin_pairs", validation=True),
        ijb=dict(type="ijb"),
        occlusion=dict(type="occlusion", validation=True)))
    # Validation pair sets looked up in data.path as <name>.bin; missing ones are skipped with a warning.
    config.eval.bin_names = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")
    config.eval.batch_size = 256  # global
    # Score fusion and occluded variants (used by eval.py, not by train-time validation). Variants: "clean";
    # a kind of data_pipelines.occlusion.KINDS on the second image of each pair; "both_<kind>" on both images
    # (independent draws); "cross" (a mask on the first image, sunglasses on the second).
    config.eval.fusion_weights = (0.5, 0.5)
    config.eval.occlusion_variants = ("clean", "blocks", "mask", "sunglasses", "both_blocks", "both_mask",
                                      "both_sunglasses", "cross")
    # OAML's visibility-gated score takes QAConv for a pair whose mean predicted visibility is below this, else
    # AdaFace; protocols with training folds (pair sets) fit it there instead.
    config.eval.gate_threshold = 0.5
    # Occlusion sets the "occlusion" evaluator scores whole (oaml_jax/evaluation/occlusion_sets.py); () = the
    # held-out part (data.occlusion_holdout) of data.occlusion_sets.
    config.eval.occlusion_sets = ml_collections.FieldReference((), field_type=object)
    # Folder of the .bin sets for eval.py; "" = data.path.
    config.eval.data_dir = ""
    # Also write eval.py's scalars and figures to TensorBoard (needs tensorflow): one events file per evaluated
    # checkpoint step in <workdir>/eval, replaced when that step is evaluated again.
    config.eval.tensorboard = True
    # IJB-B/C 1:1 verification: insightface's IJB_release folder (or one set's folder); "" = off.
    config.eval.ijb_root = ""
    config.eval.ijb_names = ("ijbb", "ijbc")
    # QAConv and fused template scores: the mean over every image pair of every template pair, billions
    # of pair scores on IJB-C; feature maps are then kept on the host in float16 (7x7x512 x 2 bytes x 469,375
    # IJB-C images: about 23.5 GB).
    config.eval.ijb_qaconv = False
    config.eval.ijb_batch_size = 0  # faces per extraction call; 0 = eval.batch_size
    config.eval.ijb_qaconv_chunk = 4096  # image pairs per QAConv call

    config.distributed = ml_collections.ConfigDict()
    # Call jax.distributed.initialize (multi-host). With an empty coordinator address, jax discovers the
    # cluster itself (Cloud TPU, SLURM, ...). On CPU, gloo collectives are enabled first.
    config.distributed.initialize = False
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = 1
    config.distributed.process_id = 0

    if arg == "test":
        _shrink_for_tests(config)
    elif arg is not None:
        raise ValueError(f"oaml_jax/configs/default.py: unknown config argument {arg!r}; expected None or 'test'")
    return config


def _shrink_for_tests(config: ml_collections.ConfigDict) -> None:
    """A tiny narrow model and a few steps: compiles and runs in seconds on a CPU."""
    config.model.arch = "ir_18"
    config.model.backbone = ml_collections.ConfigDict(dict(
        stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32), embedding_size=32))
    config.data.path = "demo_workdir/data"
    config.data.augment.lowres_prob = 0.0
    config.optim.lr = 1.0  # per 512 images: 0.03 for the batch of 16
    config.optim.drop_epochs = (2,)
    config.train.epochs = 2
    config.train.batch_size = 16
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.keep = 2
    config.train.eval_every = -1
    config.eval.bin_names = ("val",)
    config.eval.batch_size = 16

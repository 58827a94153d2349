"""What a pod runs lowers for TPU and for CUDA from this CPU machine (`jax.export` with `platforms=`).

Over 8 fake CPU devices (a subprocess, XLA_FLAGS set before jax is imported), with the shardings a run
uses: the train step (full OAML: AdaFace, QAConv in matching groups of one device's images, occlusion
head; state donated), the embedding model (`FaceModel.forward` with feature maps, batch split over the
devices) and the StableHLO artefact `oaml_jax.export` writes. An op with no lowering on a platform (a
CPU-only custom call, a GPU-only kernel) makes `jax.export` raise here, naming the op.
"""

import json
import textwrap

import pytest

import train_worker

DEVICES = 8
GLOBAL_BATCH = 64  # 8 images per device: one matching group of 2 identities x K=4
GROUP = 8
PLATFORMS = ("tpu", "cuda")

SCRIPT = textwrap.dedent(f"""
    import json, sys, tempfile
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from oaml_jax import export, optim, sharding, step
    from oaml_jax.configs import default
    from oaml_jax.serving import FaceModel
    from oaml_jax.models import factory

    config = default.get_config("test")
    config.model.qaconv_group_size = {GROUP}
    mesh = sharding.make_mesh()
    model = factory.build_model(config.model, sharding.padded_num_classes(10, jax.device_count()))
    contract = factory.input_contract(config.model)
    tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=10, epochs=config.train.epochs,
                                        global_batch={GLOBAL_BATCH})
    train = step.build_train_step(model, tx, schedule, contract, mesh, global_batch={GLOBAL_BATCH})
    state = train.init(jax.random.PRNGKey(0))
    variables = state.variables()
    face_model = FaceModel(model, variables, contract, batch_size=16)
    images = jax.ShapeDtypeStruct(({GLOBAL_BATCH}, 112, 112, 3), jax.numpy.uint8,
                                  sharding=NamedSharding(mesh, P("data")))
    abstract_variables = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), variables)
    embed = jax.jit(face_model.forward(flip=True, feature_maps=True))
    result = {{"devices": jax.device_count(), "train": {{}}, "embed": {{}}}}
    for platform in {PLATFORMS!r}:
        lowered = jax.export.export(train.step, platforms=(platform,))(train.abstract_state, train.abstract_batch)
        text = lowered.mlir_module()
        result["train"][platform] = {{
            "platforms": list(lowered.platforms), "nr_devices": lowered.nr_devices,
            "in_specs": [str(tuple(s.spec)) for s in lowered.in_shardings_jax(mesh)],
            "donated": text.count("tf.aliasing_output"), "state_leaves": len(jax.tree.leaves(state)),
            "num_partitions": "mhlo.num_partitions = 8" in text}}
        lowered = jax.export.export(embed, platforms=(platform,))(abstract_variables, images)
        result["embed"][platform] = {{
            "platforms": list(lowered.platforms), "nr_devices": lowered.nr_devices,
            "image_spec": str(tuple(lowered.in_shardings_jax(mesh)[-1].spec)),
            "outputs": sorted(lowered.out_tree.unflatten(range(len(lowered.out_avals))))}}
    out_dir = tempfile.mkdtemp()
    path = export.export(face_model.forward(flip=True), jax.device_get(variables), fmt="stablehlo",
                         out_dir=out_dir, platforms={PLATFORMS!r})
    artefact = jax.export.deserialize(path.read_bytes())
    result["artefact"] = {{"platforms": list(artefact.platforms), "nr_devices": artefact.nr_devices,
                          "outputs": sorted(artefact.out_tree.unflatten(range(len(artefact.out_avals)))),
                          "input": str(artefact.in_avals[0])}}
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_train_step_embedding_model_and_export_lower_for_tpu_and_cuda():
    proc = train_worker.run_script_on_devices(SCRIPT, devices=DEVICES)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == DEVICES
    for platform in PLATFORMS:
        train = result["train"][platform]
        assert train["platforms"] == [platform] and train["nr_devices"] == DEVICES
        assert train["num_partitions"]
        # The batch (image, label, mask, corrupt: the last 4 inputs) split over the devices on its first
        # axis; of the state, only the class kernel and its momentum are split (on the class axis).
        specs = train["in_specs"]
        assert len(specs) == train["state_leaves"] + 4
        assert specs[-4:] == ["('data',)"] * 4
        assert sorted(set(specs[:-4]) - {"()"}) == ["(None, 'data')"]
        assert specs[:-4].count("(None, 'data')") == 2
        assert train["donated"] == train["state_leaves"]  # every state buffer is reused for the new state
        embed = result["embed"][platform]
        assert embed["platforms"] == [platform] and embed["nr_devices"] == DEVICES
        assert embed["image_spec"] == "('data',)"
        assert embed["outputs"] == ["embedding", "feature_map", "norm", "occlusion"]
    artefact = result["artefact"]
    assert artefact["platforms"] == list(PLATFORMS) and artefact["nr_devices"] == 1
    assert artefact["outputs"] == ["embedding", "norm", "occlusion"]
    assert artefact["input"] == "uint8[N,112,112,3]"

"""Algorithm 1 of Branched Multi-Task Networks (Vandenhende et al., section 3) as a bundle stage.

:class:`BranchedSearch` trains one single-task network per task with the bundle's own training
config (hard sharing, only that task's loss; identical encoder and recipe, section 3.1), measures the
task affinity at the backbone's branchable blocks on a seeded subset of held-out images (RSA), and
picks the tree of least dissimilarity under the parameter budget (section 3.2). It writes
``affinity.npz``, ``tree.json`` and the figures (affinity heat maps, fig. 2a; cost against parameters
of the trees searched, fig. 2b; the chosen tree), and logs them to TensorBoard. The ``branched``
variant of the bundle then trains the network of ``tree.json``.

The bundles differ in a few names, which are arguments (the vision bundle's are the defaults): the
config id of the loss weights (``weights_id``), the final checkpoint of a training run and its key
(``ckpt_name``, ``ckpt_key``), the image key of the held-out items (``image_key``). A 2D network on
3D volumes (the pelvis bundle) gets ``slice_size``: the held-out images are then axial slices of the
validation volumes (:func:`held_out_slices`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from mtl_med.errors import ConfigError
from .affinity import AffinityResult, affinity_image, pareto_image, save_affinity, select_images, task_affinity, tree_image
from .trees import budget_from_fraction, save_tree_json, search_beam, search_exhaustive

__all__ = ["BranchedSearch", "held_out_slices"]

log = logging.getLogger(__name__)


def _png(path: str, image) -> None:
    import matplotlib.pyplot as plt

    tmp = f"{path}.tmp.png"
    plt.imsave(tmp, image)
    os.replace(tmp, path)


def held_out_slices(
    volumes,
    num_images: int = 500,
    seed: int = 0,
    size: Sequence[int] = (128, 128),
    image_key: str = "mr",
    axis: int = 2,
) -> torch.Tensor:
    """``K = min(num_images, number of slices)`` 2D slices of 3D volumes, drawn with ``seed``: the
    held-out images of a 2D network trained on slices.

    Every volume of ``volumes`` (a dataset of ``{image_key: (C, H, W, D)}`` items, preprocessed, as a
    bundle's ``validate#dataset`` yields them) is cut into its slices along spatial axis ``axis`` (2:
    axial), each brought to ``size`` by centred zero padding or cropping (MONAI's
    ``ResizeWithPadOrCrop``), so every image has the same number of features at every location; the K
    slices are then drawn without replacement from all of them, in dataset order
    (:func:`~mtl_med.sharing.branched.affinity.select_images`: the same slices for every task). Every
    slice is held until the draw (the validation split: small). Returns ``(K, C, *size)`` float32 on
    the CPU.
    """
    from monai.transforms import ResizeWithPadOrCrop

    size = [int(s) for s in size]
    if len(size) != 2 or min(size) < 1 or axis not in (0, 1, 2):
        raise ConfigError("slice_size / slice_axis", f"held-out slices need an in-plane size of two positive ints and a slice axis 0, 1 or 2, got {size} and {axis}")
    resize = ResizeWithPadOrCrop([*size[:axis], -1, *size[axis:]])  # -1: the slice axis keeps its length
    slices = []
    for i in range(len(volumes)):
        item = volumes[i]
        v = torch.as_tensor(item[image_key] if isinstance(item, Mapping) else item)
        v = v.as_subclass(torch.Tensor).detach().cpu()
        if v.dim() != 4:
            raise ConfigError("image_key", f"held-out volume {i}: {image_key!r} must be (C, H, W, D), got shape {tuple(v.shape)}")
        slices.append(torch.as_tensor(resize(v)).as_subclass(torch.Tensor).movedim(axis + 1, 0).float())
    if not slices:
        raise ConfigError("images", "no held-out volumes to draw slices from (the validation split is empty)")
    x = torch.cat(slices)
    return x[select_images(x.shape[0], num_images, seed)].contiguous()


class BranchedSearch:
    """Single-task encoders, task affinity and the tree under a budget.

    Args:
        config_file: the bundle's training config(s); each encoder is trained with them and
            ``overrides`` (the recipe of the run that asks for the search).
        task_names: the tasks.
        output_dir: where ``single_task/<task>/``, ``affinity.npz``, ``tree.json`` and the figures go.
        images: held-out images ``(M, C, ...)`` or a dataset of ``{image_key: ...}`` items (the
            validation split; volumes with ``slice_size``); ``num_images`` of them are drawn with
            ``seed`` (section 3.1: a held-out subset, K = 500 as Dwivedi & Roig).
        budget: parameters of the whole network, or ``None`` to use ``budget_fraction`` (0: hard
            sharing, 1: single-task networks).
        search: ``"exhaustive"``, ``"beam"`` (section 3.2's beam search for many tasks) or ``"auto"``
            (exhaustive search up to 5 tasks, beam search beyond).
        first_shared: leading blocks shared by every task (the stem always is).
        retrain: train the encoders again even where ``single_task/<task>/<ckpt_name>`` exists.
        summary_writer: TensorBoard writer for the figures.
        weights_id: the config id of the task -> loss weight mapping (vision ``task_weights``, pelvis
            ``loss_weights``); each encoder gets weight 1 for its task, 0 for the others.
        ckpt_name, ckpt_key: the final checkpoint a training run writes in ``ckpt_dir`` (vision
            ``model_final.pt``, pelvis ``checkpoint_final.pt``) and the key of the network's state in
            it (``None``: the file is the state dict).
        image_key: the image of a held-out item (vision ``image``, pelvis ``mr``).
        slice_size, slice_axis: for a 2D network on 3D data, the held-out images are
            :func:`held_out_slices` of the ``images`` volumes, brought to ``slice_size``; ``None``
            (default): the items are the images.
    """

    def __init__(
        self,
        config_file: str | Sequence[str],
        task_names: Sequence[str],
        output_dir: str | os.PathLike,
        images,
        budget: int | None = None,
        budget_fraction: float = 0.5,
        num_images: int = 500,
        seed: int = 0,
        search: str = "auto",
        first_shared: int = 1,
        center_features: bool = True,
        pool_to: Sequence[int] | None = None,
        overrides: Mapping | None = None,
        retrain: bool = False,
        summary_writer=None,
        device: torch.device | str | None = None,
        weights_id: str = "task_weights",
        ckpt_name: str = "model_final.pt",
        ckpt_key: str | None = "model",
        image_key: str = "image",
        slice_size: Sequence[int] | None = None,
        slice_axis: int = 2,
    ):
        if search not in ("auto", "exhaustive", "beam"):
            raise ConfigError("search", f"must be 'auto', 'exhaustive' or 'beam', got {search!r}")
        if budget is None and not 0.0 <= float(budget_fraction) <= 1.0:
            raise ConfigError("budget_fraction", f"must be in [0, 1], got {budget_fraction}")
        self.config_file = [str(f) for f in ([config_file] if isinstance(config_file, (str, os.PathLike)) else config_file)]
        self.task_names, self.output_dir = [str(t) for t in task_names], str(output_dir)
        self.images, self.budget, self.budget_fraction = images, budget, float(budget_fraction)
        self.num_images, self.seed, self.search, self.first_shared = int(num_images), int(seed), search, int(first_shared)
        self.center_features, self.pool_to = center_features, pool_to
        self.overrides, self.retrain, self.writer = dict(overrides or {}), retrain, summary_writer
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.weights_id, self.ckpt_name, self.ckpt_key = str(weights_id), str(ckpt_name), ckpt_key
        self.image_key, self.slice_axis = str(image_key), int(slice_axis)
        self.slice_size = None if slice_size is None else [int(s) for s in slice_size]

    # --- stage 1: one single-task network per task ---------------------------------------------
    def _encoder_overrides(self, task: str) -> dict:
        root = os.path.join(self.output_dir, "single_task", task)
        return {
            **self.overrides,
            "sharing": "hard_sharing",
            "variant": f"single_task_{task}",
            self.weights_id: {t: float(t == task) for t in self.task_names},
            "ckpt_dir": root,
            "output_dir": root,
        }

    def train_encoders(self) -> list[str]:
        """The checkpoint of each task's single-task network, trained here unless it exists."""
        paths = []
        for task in self.task_names:
            over = self._encoder_overrides(task)
            path = os.path.join(over["ckpt_dir"], self.ckpt_name)
            if self.retrain or not os.path.exists(path):
                log.info("Branched MTN: training the single-task network of %r (%s)", task, path)
                wf = ConfigWorkflow(config_file=self.config_file, workflow_type="train", **over)
                wf.initialize()
                wf.run()
                wf.finalize()
            else:
                log.info("Branched MTN: reusing the single-task network of %r (%s)", task, path)
            paths.append(path)
        return paths

    def _network(self, **overrides) -> torch.nn.Module:
        parser = ConfigParser()
        parser.read_config(self.config_file)
        parser.update({**self.overrides, **overrides})
        return parser.get_parsed_content("network_def", instantiate=True)

    def _held_out(self) -> torch.Tensor:
        if isinstance(self.images, torch.Tensor):
            return self.images
        if self.slice_size is not None:
            return held_out_slices(self.images, self.num_images, self.seed, self.slice_size, self.image_key, self.slice_axis)
        n = len(self.images)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: min(self.num_images, n)].sort().values
        return torch.stack([torch.as_tensor(self.images[int(i)][self.image_key]) for i in idx])

    def _load(self, path: str) -> dict:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if self.ckpt_key is None:
            return state
        if self.ckpt_key not in state:
            raise ConfigError(path, f"no {self.ckpt_key!r} in the checkpoint (keys {sorted(state)}); check ckpt_key")
        return state[self.ckpt_key]

    # --- stage 2: affinity and tree --------------------------------------------------------------
    def affinity_of(self, checkpoints: Mapping[str, str | os.PathLike]) -> AffinityResult:
        """The RSA affinity between any single-task networks of this recipe, ``{name: checkpoint}``
        (for instance one task's networks trained with two seeds: a same-task control), measured as
        :meth:`run` measures the tasks' (the same held-out images, drawn with ``seed``, the same
        locations and correlations). Names are the rows and columns of the result."""
        nets = {}
        for name, path in checkpoints.items():
            net = self._network(sharing="hard_sharing")
            net.load_state_dict(self._load(os.fspath(path)))
            nets[str(name)] = net.to(self.device)
        images = self._held_out()
        log.info("Branched MTN: affinity of %d networks on %d held-out images", len(nets), min(self.num_images, images.shape[0]))
        return task_affinity(nets, images, num_images=self.num_images, seed=self.seed,
                             center_features=self.center_features, pool_to=self.pool_to, device=self.device)

    def run(self) -> dict:
        """Encoders, affinity, search; returns the ``tree.json`` record."""
        os.makedirs(self.output_dir, exist_ok=True)
        result = self.affinity_of(dict(zip(self.task_names, self.train_encoders())))
        A, locations, num_images = result.affinity, result.location_names, result.num_images

        shared = self._network(sharing="branched")  # every block shared: the per-block parameter counts
        block_params = [sum(p.numel() for p in branches[0].parameters()) for branches in shared.blocks]
        fixed = sum(p.numel() for p in shared.stem.parameters()) + sum(p.numel() for p in shared.heads.parameters())
        budget = self.budget
        if budget is None:
            budget = budget_from_fraction(self.budget_fraction, block_params, len(self.task_names), fixed, self.first_shared)
        dissimilarity = (1.0 - torch.as_tensor(A)).numpy()
        method = self.search
        if method == "auto":
            method = "exhaustive" if len(self.task_names) <= 5 else "beam"
        search = search_exhaustive if method == "exhaustive" else search_beam
        found = search(dissimilarity, block_params, budget, fixed_params=fixed, first_shared=self.first_shared)
        config, cost, params = found["config"], found["cost"], found["params"]
        log.info("Branched MTN: %s search, budget %d parameters: tree %s, cost %.4f, %d parameters", method, budget, config, cost, params)

        block_names = [f"block{l + 1}" for l in range(len(block_params))]
        save_affinity(os.path.join(self.output_dir, "affinity.npz"), A, self.task_names, locations or block_names,
                      num_images=num_images, seed=self.seed, center_features=self.center_features, pool_to=self.pool_to)
        record = dict(config=config, task_names=self.task_names, block_names=block_names, cost=float(cost), params=int(params),
                      budget=int(budget), search=method, block_params=block_params, fixed_params=int(fixed))
        save_tree_json(os.path.join(self.output_dir, "tree.json"), **record)
        images = {
            "branched/affinity": affinity_image(A, self.task_names, block_names),
            "branched/tree": tree_image(config, self.task_names, block_names),
        }
        if found.get("table"):
            images["branched/pareto"] = pareto_image(found["table"], chosen=config)
        for tag, image in images.items():
            _png(os.path.join(self.output_dir, tag.split("/")[1] + ".png"), image)
            if self.writer is not None:
                self.writer.add_image(tag, image, 0, dataformats="HWC")
        if self.writer is not None:
            self.writer.flush()
        return record

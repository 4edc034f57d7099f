"""The typed config tree shared by every stage.

YAML files are merged left to right, then dotted overrides (``train.lr=1e-3``) are applied, then
``${section.key}`` references in strings are filled in, then every section validates itself. An unknown key or a
value of the wrong type is a :class:`ConfigError` that names the valid keys, raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipline.errors import UsageError


class ConfigError(UsageError):
    """A config that cannot be used; the message says what is wrong and how to fix it."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class RunConfig:
    name: str = "clipline"
    """Run name: used for wandb and in results records."""
    output_dir: str = "runs/clipline"
    """Root folder of this run's artifacts; stage folders default to places under it."""
    seed: int = 0
    """Seed for model init, data order and augmentation."""
    smoke: bool = False
    """Shrink this config to a CPU run of a few steps, to check it end to end before a real run: few steps of a
    small batch, the model shrunk within its family (and model.pretrained dropped when it no longer fits), the
    first eval dataset of each task, wandb off, outputs under run.output_dir/smoke. Data paths are kept as they
    are. What it changes is printed."""

    def validate(self) -> None:
        _check(bool(self.name), "run.name must not be empty")
        _check(bool(self.output_dir), "run.output_dir must not be empty")


@dataclass
class DemoConfig:
    num_train: int = 12000
    """Procedural training scenes to generate."""
    num_eval: int = 1000
    """Held-out scenes (never seen in training, captions included) for eval."""
    captions_per_eval_image: int = 3
    """Captions per held-out image, for retrieval."""
    image_size: int = 64
    """Side of the generated scenes in pixels."""
    seed: int = 1234
    """Seed of the scene generator."""
    source_dir: str = "${run.output_dir}/demo_source"
    """Where the generated images and URL lists are written (and served from over HTTP on 127.0.0.1)."""
    eval_output_dir: str = "${run.output_dir}/shards/eval"
    """Shards of the held-out split; prep.output_dir receives the training split."""
    check_minimums: bool = True
    """After eval, check the results against the minimums the README promises for configs/demo.yaml
    (clipline/demo_check.py: colour top-1 > 90%, shape top-1 > 40%, image->text R@5 > 90%): PASS/FAIL per minimum,
    and `clipline demo` exits with code 3 if one is missed. Off for shrunk runs such as configs/test-tiny.yaml."""

    def validate(self) -> None:
        _check(self.num_train > 0 and self.num_eval > 0, "demo.num_train and demo.num_eval must be > 0")
        _check(self.captions_per_eval_image >= 1, "demo.captions_per_eval_image must be >= 1")
        _check(self.image_size >= 16, "demo.image_size must be >= 16")


DEFAULT_BOILERPLATE = [
    r"(image|photo|picture|img|pic|thumbnail|untitled|placeholder|default|no image|image not found|"
    r"no description|description|caption|null|none|n/?a|undefined|loading\.*|click to enlarge|\d+)",
    r"(img|dsc|dscn|dscf|pict|p|photo|image|screenshot|screen shot)[\s_\-]*\d+[\w\-]*(\.(jpe?g|png|gif|webp|bmp|tiff?))?",
    r"\S+\.(jpe?g|png|gif|webp|bmp|tiff?)",
    r"https?://\S+",
]
"""Captions that are placeholders, not descriptions: file names, camera names, bare words like 'image', URLs.
Each matches a whole caption, never a part: a sentence that ends in a file name is a caption."""


@dataclass
class PrepFilterConfig:
    """Filters of `clipline prep`, in the order they run; each one counts what it removed, by reason."""

    min_caption_chars: int = 5
    """Drop captions shorter than this many characters (after stripping whitespace)."""
    max_caption_chars: int = 2000
    """Drop captions longer than this; 0: no limit."""
    min_caption_words: int = 2
    """Drop captions with fewer words than this."""
    max_caption_words: int = 0
    """Drop captions with more words than this; 0: no limit."""
    languages: list[str] = field(default_factory=list)
    """Keep only captions detected as one of these ISO 639-1 codes (e.g. [en]); empty keeps every language.
    Detection uses py3langid, whose model ships inside the package (nothing is downloaded)."""
    min_language_score: float = 0.5
    """With languages set: the detector's probability for the language must reach this."""
    drop_boilerplate: bool = True
    """Drop placeholder captions (file names, 'image', 'untitled', bare URLs, ...) matching boilerplate_patterns."""
    boilerplate_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_BOILERPLATE))
    """Regular expressions a whole caption is matched against (case-insensitive) to count as boilerplate."""
    exact_dedup: bool = True
    """Keep only the first sample of each distinct image content (sha256 of the downloaded bytes)."""
    near_dedup_distance: int = -1
    """Drop an image whose perceptual hash is within this Hamming distance (of 64 bits) of an earlier kept one;
    -1 disables near-duplicate removal (0 removes only identical hashes)."""
    decontaminate: list[str] = field(default_factory=list)
    """Eval datasets to keep out of training: folders of webdataset shards or of image files. A training image
    whose perceptual hash is within decontaminate_distance of any of their images is dropped."""
    decontaminate_distance: int = 4
    """Hamming distance (of 64 bits) at or below which a training image counts as an eval image."""
    clip_model: str = ""
    """CLIP-score filter model: a clipline checkpoint or training run folder (its newest checkpoint), an open_clip
    local-dir folder, an open_clip model JSON file or architecture name (with clip_pretrained); empty: no filter."""
    clip_pretrained: str = ""
    """Weights file for clip_model when it is a name or a JSON file."""
    clip_min_score: float | None = None
    """Keep samples whose image-text cosine similarity is at least this (DataComp's threshold baseline)."""
    clip_keep_fraction: float | None = None
    """Keep this top fraction of samples by CLIP score (DataComp's top-k% baseline), after the other filters."""
    clip_batch_size: int = 256
    """Images per forward pass of the CLIP-score model."""
    clip_device: str = "cpu"
    """Device of the CLIP-score model: cpu, cuda or auto."""
    clip_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of the CLIP-score model (scores are computed in fp32 whatever this is). 'auto': bf16 on
    CUDA devices with bf16 and on CPUs with native bf16 (AVX512_BF16/AMX), fp32 otherwise; printed at start."""
    semantic_dedup: bool = False
    """SemDeDup: embed every image with embed_model, k-means them, and within each cluster drop images whose cosine
    similarity to a kept one exceeds 1 - semdedup_eps (the removed pairs are listed in semdedup_pairs.jsonl)."""
    semdedup_eps: float = 0.05
    """Semantic dedup: images closer than cosine 1 - eps to a kept image of their cluster are duplicates."""
    semdedup_clusters: int = 100
    """Semantic dedup: k-means clusters (duplicates are only looked for within a cluster)."""
    semdedup_keep: Literal["centroid", "clip_score"] = "centroid"
    """Semantic dedup: which of a group of duplicates is kept: the one closest to its cluster centroid, or the one
    with the highest CLIP score (needs clip_model)."""
    semdedup_use_text: bool = False
    """Semantic dedup: compare image + caption embeddings (their normalised sum) instead of images alone."""
    cluster_filter_classnames: list[str] = field(default_factory=list)
    """DataComp image-based clustering: class-name files (one name a line) or names shipped in
    configs/eval/classnames/ (e.g. cifar10); keep only images whose k-means cluster is among the
    cluster_filter_nearest clusters nearest to some class name's text embedding. Empty: no filter."""
    cluster_filter_clusters: int = 100
    """Cluster filter: k-means clusters over the image embeddings (DataComp-1B used 100k on 12.8B samples)."""
    cluster_filter_nearest: int = 1
    """Cluster filter: clusters kept per class name (its nearest centroids by cosine)."""
    cluster_filter_template: str = "a photo of a {}."
    """Cluster filter: the text embedded for each class name ({} is replaced by the name)."""
    embed_model: str = ""
    """Model that embeds images for semantic_dedup and cluster_filter: a clipline checkpoint or run folder, an
    open_clip folder, ARCH:WEIGHTS_FILE, a Hugging Face CLIP folder, or thumbnail:N (model-free: the image at N x N,
    mean-removed; catches only near-pixel copies, for smoke runs and tests). Embeddings are cached per shard in
    output_dir/_curate/embeddings and reused while the shard and model are unchanged."""
    embed_batch_size: int = 64
    """Images per forward pass of embed_model."""
    embed_device: str = "cpu"
    """Device of embed_model: cpu, cuda or auto."""
    kmeans_sample: int = 100_000
    """k-means centroids are fit on at most this many embeddings, sampled with kmeans_seed (faiss)."""
    kmeans_iterations: int = 20
    """k-means iterations."""
    kmeans_seed: int = 0
    """Seed of the k-means sample and initialisation."""
    balance_entries: str = ""
    """MetaCLIP balancing: a metadata entries file (one entry a line), or 'demo' for the list shipped for the demo
    scenes (configs/prep/metadata_demo.txt); empty: no balancing. Each caption's entries are found by Aho-Corasick
    substring matching (lower-cased)."""
    balance_t: int = 20_000
    """MetaCLIP's cap t: an entry matched by count > t captions keeps each with p = t / count; a caption is kept
    with probability 1 - prod(1 - p) over its entries (MetaCLIP-400M used 20k)."""
    balance_seed: int = 0
    """Seed of the balancing draw: each sample's draw depends only on the seed and its key, so the kept set does not
    depend on order or parallelism."""
    balance_whole_words: bool = True
    """Match entries only as whole words ('cat' not inside 'concatenate'); false: plain substrings, as MetaCLIP."""
    balance_keep_unmatched: bool = False
    """Keep captions that match no entry (MetaCLIP drops them)."""

    def validate(self) -> None:
        for key in ("min_caption_chars", "max_caption_chars", "min_caption_words", "max_caption_words"):
            _check(getattr(self, key) >= 0, f"prep.filters.{key} must be >= 0, got {getattr(self, key)}")
        _check(not self.max_caption_chars or self.max_caption_chars >= self.min_caption_chars,
               "prep.filters.max_caption_chars must be 0 (no limit) or >= min_caption_chars")
        _check(not self.max_caption_words or self.max_caption_words >= self.min_caption_words,
               "prep.filters.max_caption_words must be 0 (no limit) or >= min_caption_words")
        for lang in self.languages:
            _check(bool(re.fullmatch(r"[a-z]{2,3}", lang)),
                   f"prep.filters.languages: {lang!r} is not an ISO 639-1 code such as 'en' or 'de'")
        _check(0.0 <= self.min_language_score <= 1.0, "prep.filters.min_language_score must be in [0, 1]")
        for pattern in self.boilerplate_patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"prep.filters.boilerplate_patterns: {pattern!r} is not a regular expression "
                                  f"({e})") from None
        _check(-1 <= self.near_dedup_distance <= 16, "prep.filters.near_dedup_distance must be in -1..16")
        _check(0 <= self.decontaminate_distance <= 16, "prep.filters.decontaminate_distance must be in 0..16")
        _check(self.clip_keep_fraction is None or 0.0 < self.clip_keep_fraction <= 1.0,
               "prep.filters.clip_keep_fraction must be in (0, 1]")
        _check(self.clip_min_score is None or -1.0 <= self.clip_min_score <= 1.0,
               "prep.filters.clip_min_score is a cosine similarity: it must be in [-1, 1]")
        _check(not self.clip_model or self.clip_min_score is not None or self.clip_keep_fraction is not None,
               "prep.filters.clip_model is set but neither clip_min_score nor clip_keep_fraction is: say what to keep")
        _check(bool(self.clip_model) or (self.clip_min_score is None and self.clip_keep_fraction is None),
               "prep.filters.clip_min_score / clip_keep_fraction need prep.filters.clip_model (the scoring model)")
        _check(self.clip_batch_size > 0, "prep.filters.clip_batch_size must be > 0")
        _check(self.clip_device in ("cpu", "cuda", "auto"), "prep.filters.clip_device must be cpu, cuda or auto")
        self._validate_curation()

    def _validate_curation(self) -> None:
        embeds = self.semantic_dedup or bool(self.cluster_filter_classnames)
        _check(not embeds or bool(self.embed_model),
               "prep.filters.semantic_dedup / cluster_filter_classnames need prep.filters.embed_model (the model "
               "that embeds the images)")
        _check(0.0 < self.semdedup_eps < 1.0, "prep.filters.semdedup_eps must be in (0, 1)")
        _check(self.semdedup_keep != "clip_score" or not self.semantic_dedup or bool(self.clip_model),
               "prep.filters.semdedup_keep=clip_score needs prep.filters.clip_model (the scores to rank by)")
        for key in ("semdedup_clusters", "cluster_filter_clusters", "cluster_filter_nearest", "embed_batch_size",
                    "kmeans_sample", "kmeans_iterations", "balance_t"):
            _check(getattr(self, key) > 0, f"prep.filters.{key} must be > 0, got {getattr(self, key)}")
        _check("{}" in self.cluster_filter_template,
               "prep.filters.cluster_filter_template must contain {} (where the class name goes)")
        _check(self.embed_device in ("cpu", "cuda", "auto"), "prep.filters.embed_device must be cpu, cuda or auto")


@dataclass
class PrepConfig:
    url_list: str = ""
    """URL + caption list: a file, a folder of files or a glob ('lists/*.parquet'), in .parquet, .csv, .tsv,
    .jsonl or .txt (one URL per line, optionally a tab and the caption)."""
    url_col: str = "url"
    """Column holding the image URL."""
    caption_col: str = "caption"
    """Column holding the caption."""
    extra_columns: list[str] | None = None
    """Columns carried into each sample's .json; null carries every other column, [] carries none."""
    output_dir: str = "${run.output_dir}/shards/train"
    """Folder the webdataset shards, sizes.json, manifest.json, stats.json and report.md are written to."""
    input_shards: str = ""
    """Filter an existing folder of webdataset shards instead of downloading (url_list is then unused): the
    survivors are re-sharded into output_dir."""
    mode: Literal["resume", "overwrite"] = "resume"
    """'resume': the same command continues an interrupted build; 'overwrite': delete this build's files in
    output_dir first and start again."""
    image_size: int = 256
    """Target image side for img2dataset's resize."""
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "center_crop"
    """img2dataset resize mode."""
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    """Image encoding inside the shards."""
    encode_quality: int = 95
    """JPEG/WebP quality (1..100); for png, the compression level (0..9)."""
    samples_per_shard: int = 10000
    """Samples per tar shard."""
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"
    """img2dataset distributor: local processes, or Spark (the active session, else a local one) for a cluster."""
    spark_master: str = ""
    """With distributor=pyspark and no active Spark session: the master of the session to create
    (default local[processes])."""
    processes: int = 2
    """Download processes."""
    threads: int = 32
    """Download threads per process."""
    timeout: int = 10
    """Seconds a single connect or read may block."""
    deadline: float = 30.0
    """Seconds one image may take in all: connections, redirects, retries and reads (img2dataset has none)."""
    retries: int = 0
    """Extra attempts for failures that can pass (timeouts, resets, 5xx, 408, 429); 404s are never retried."""
    per_host_connections: int = 0
    """Polite crawling: most requests at once to one host, per download process (a host sees at most
    processes x this); 0: no cap."""
    per_host_rate: float = 0.0
    """Polite crawling: most request starts per second to one host, per download process; 0: no limit."""
    max_retry_after: float = 60.0
    """Polite crawling: a 429/503 answer's Retry-After is waited for (pausing that host) when it asks for at most
    this many seconds and retries and the deadline allow; a longer one gives the image up."""
    max_image_bytes: int = 20_000_000
    """Largest response body read; larger images are refused."""
    max_image_pixels: int = 89_478_485
    """Largest width x height, read from the image header before decoding (decompression-bomb guard)."""
    accepted_content_types: list[str] = field(
        default_factory=lambda: ["image/*", "application/octet-stream", "binary/octet-stream"])
    """Content-Type patterns that agree with image bytes (a missing header agrees). The bytes decide what is an
    image; a disagreeing header is only counted (report.md), unless check_content_type is on."""
    check_content_type: bool = False
    """Opt-in: refuse a response whose Content-Type is not in accepted_content_types, even when its bytes are an
    image (the web serves real images as text/plain or octet-stream, so this loses images); off, the bytes decide:
    the format's own magic and a successful decode."""
    min_image_size: int = 0
    """Drop images whose smaller original side is below this (0 keeps all)."""
    max_aspect_ratio: float = 0.0
    """Drop images whose longer/shorter original side ratio exceeds this (0: no limit)."""
    user_agent_token: str = "clipline"
    """Token in the HTTP user agent, so site owners can identify the crawler; robots.txt rules for it apply."""
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    """X-Robots-Tag directives that make a response be skipped (opt-out)."""
    respect_robots_txt: bool = True
    """Read each host's robots.txt once and skip URLs it disallows for user_agent_token."""
    allow_private_networks: bool = False
    """Allow URLs whose host resolves to loopback/private/link-local addresses (local demo and tests only)."""
    allowed_networks: list[str] = field(default_factory=list)
    """Non-public networks allowed anyway, as CIDRs (e.g. [127.0.0.1/32] for one local server); everything else
    non-public stays refused, redirects included."""
    keep_downloads: bool = True
    """Keep img2dataset's unfiltered shards in output_dir/_download, so that changed filters re-run without
    downloading again; false deletes them once the build is complete."""
    filters: PrepFilterConfig = field(default_factory=PrepFilterConfig)
    """Caption, image, dedup, decontamination and CLIP-score filters."""

    def validate(self) -> None:
        for key in ("image_size", "samples_per_shard", "processes", "threads", "timeout", "max_image_bytes",
                    "max_image_pixels"):
            _check(getattr(self, key) > 0, f"prep.{key} must be > 0, got {getattr(self, key)}")
        _check(self.retries >= 0 and self.min_image_size >= 0, "prep.retries and prep.min_image_size must be >= 0")
        _check(self.deadline > 0, f"prep.deadline must be > 0 seconds, got {self.deadline}")
        _check(self.per_host_connections >= 0 and self.per_host_rate >= 0 and self.max_retry_after >= 0,
               "prep.per_host_connections, prep.per_host_rate and prep.max_retry_after must be >= 0")
        _check(self.max_aspect_ratio == 0 or self.max_aspect_ratio >= 1,
               "prep.max_aspect_ratio must be 0 (no limit) or >= 1")
        if self.encode_format == "png":
            _check(0 <= self.encode_quality <= 9, "prep.encode_quality is the compression level for png: 0..9")
        else:
            _check(1 <= self.encode_quality <= 100, "prep.encode_quality must be in 1..100")
        _check(bool(self.url_col) and bool(self.caption_col), "prep.url_col and prep.caption_col must be set")
        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"prep.allowed_networks: {net!r} is not a network; write e.g. 127.0.0.1/32") from None
        self.filters.validate()


@dataclass
class ModelConfig:
    name: str = "RN50"
    """An open_clip architecture name (see open_clip.list_models()) or a path to an open_clip model JSON file."""
    pretrained: str = ""
    """Weights to start from (fine-tuning): a .safetensors/.pt file or a clipline checkpoint folder; empty trains
    from scratch."""
    hf_text_model: str = ""
    """A local Hugging Face model folder (config.json, weights, tokenizer files) for the text tower of an
    architecture whose text_cfg has hf_model_name: it replaces that name and hf_tokenizer_name. Empty: the
    architecture's own. Checkpoints hold the tower's config and tokenizer, so they never need this folder."""
    lock_image: bool = False
    """Freeze the image tower (LiT: train the text tower against fixed image features)."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave this many of the last layer groups trainable."""
    lock_text: bool = False
    """Freeze the text tower."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: leave this many of the last layers trainable."""
    init_logit_scale: float | None = None
    """Initial log of the logit scale; null: log(1/0.07) for the clip loss, log(10) for siglip."""
    init_logit_bias: float | None = None
    """Initial learned logit bias; null: none for the clip loss, -10 for siglip (which needs one)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    lora_image: bool = False
    """LoRA adapters (through peft) on the image tower: its base weights are frozen and only the adapters train.
    Checkpoints hold the merged weights under plain open_clip names, so they load without peft."""
    lora_text: bool = False
    """LoRA adapters on the text tower (as lora_image)."""
    lora_rank: int = 8
    """Rank r of each adapter (B A, with A r x in and B out x r)."""
    lora_alpha: float = 16.0
    """Adapter scaling numerator: the update is (lora_alpha / lora_rank) B A."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input; needs every target to be a module (peft cannot apply it to parameter
    targets such as in_proj_weight)."""
    lora_targets: list[str] = field(default_factory=lambda: ["c_fc", "c_proj", "in_proj_weight"])
    """Names (or dotted name suffixes) of what gets adapters in each LoRA tower: Linear/Conv modules (the
    transformers' MLP c_fc and c_proj; conv1/conv2/conv3 in a ResNet tower) or parameters (in_proj_weight: the
    query/key/value projection of nn.MultiheadAttention; in a Hugging Face BERT-style text tower: query, key,
    value and dense). Layers whose forward never runs are skipped with a
    warning (nn.MultiheadAttention's out_proj and the ResNet attention pool's q/k/v/c_proj are read as weights),
    and a tower left with no adapter is an error."""

    def validate(self) -> None:
        _check(bool(self.name), "model.name must name an open_clip architecture or a model JSON file")
        _check(self.lock_image_unlocked_groups >= 0 and self.lock_text_unlocked_layers >= 0,
               "model.lock_image_unlocked_groups and model.lock_text_unlocked_layers must be >= 0")
        for tower in ("image", "text"):
            _check(not (getattr(self, f"lora_{tower}") and getattr(self, f"lock_{tower}")),
                   f"model.lora_{tower} and model.lock_{tower} are both set: LoRA already freezes the {tower} "
                   f"tower's base weights; set one of them")
        _check(self.lora_rank > 0 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
               "model.lora_rank and model.lora_alpha must be > 0 and model.lora_dropout in [0, 1)")
        if self.lora_image or self.lora_text:
            _check(bool(self.lora_targets), "model.lora_targets is empty: name the layers to adapt, e.g. "
                                            "[c_fc, c_proj, in_proj_weight]")


@dataclass
class TrainConfig:
    data: str = "${run.output_dir}/shards/train"
    """Training shards: a folder with sizes.json, or a brace pattern such as 'dir/{00000..00009}.tar'.
    'synthetic': one random batch made on the device and fed again every step, for measuring the model's speed
    without the input pipeline (no data cost at all)."""
    output_dir: str = "${run.output_dir}/train"
    """Run folder: resolved config, metrics.jsonl and checkpoints/ go here."""
    global_batch_size: int = 256
    """Contrastive batch over all ranks; each rank takes global_batch_size / world_size."""
    steps: int = 1000
    """Optimizer steps to train for."""
    loss: Literal["clip", "siglip"] = "clip"
    """Objective: CLIP's symmetric softmax cross-entropy, or SigLIP's pairwise sigmoid loss."""
    loss_impl: Literal["auto", "plain", "tiled"] = "auto"
    """'tiled' never materialises the B x B logits (memory flat in B, recomputed in backward); 'auto' picks it on
    CPU for global batches >= 128, where it is also faster (benchmarks/RESULTS.md), and the plain loss otherwise."""
    accum_steps: int = 1
    """Micro-batches per step. Their features are cached and the loss is computed over the whole accumulated
    batch, so the gradient equals that of one batch accum_steps times larger (logit scale included)."""
    data_mode: Literal["epoch", "resampled"] = "epoch"
    """'epoch': every shard once per epoch, in a seeded order; 'resampled': shards drawn with replacement."""
    compile: bool = False
    """torch.compile the model (under parallel=fsdp: each residual block, before it is sharded)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """'ddp': every rank holds the whole model, gradients and AdamW state (fastest where the model fits);
    'fsdp': FSDP2 shards them over the ranks (each residual block of both towers, then the root), for models that
    do not fit one device. Checkpoints are then sharded (torch.distributed.checkpoint) and resume at any world size.
    Does not compose with queue_size, distill_alpha, eval_every, LoRA or fp16 (refused at start)."""
    fsdp_reshard_after_forward: bool = True
    """parallel=fsdp: free each block's gathered parameters after its forward and gather them again in backward
    (less memory); false keeps them until backward (one all-gather fewer per block and step)."""
    fsdp_export_consolidated: bool = True
    """parallel=fsdp: also gather the whole weights to rank 0 at each checkpoint and write them as
    open_clip_model.safetensors beside the shards, so clipline eval and open_clip load the checkpoint unchanged;
    false writes shards only (export later with `clipline export`)."""
    eval_every: int = 0
    """Run the eval section's datasets every this many steps (rank 0) and log the results; 0 disables."""
    queue_size: int = 0
    """MoCo-style: keep this many past momentum features (image and text) as extra negatives; 0 disables.
    Turns on the momentum encoder."""
    momentum: float = 0.995
    """Momentum of the key encoder (theta_k <- m theta_k + (1 - m) theta_q) when queue_size or distill_alpha is
    set."""
    distill_alpha: float = 0.0
    """ALBEF momentum distillation: weight of the momentum model's soft targets against the one-hot targets;
    0 disables. Turns on the momentum encoder."""
    simclr_weight: float = 0.0
    """SLIP: weight of SimCLR's NT-Xent loss between two augmented views of each image, added to the image-text
    loss; 0 disables. Needs image_pipeline=fast (the views come from its decoder)."""
    simclr_temperature: float = 0.1
    """Temperature tau of the NT-Xent loss (SLIP's 0.1)."""
    simclr_hidden_dim: int = 0
    """Hidden width of the SimCLR projection head; 0: 8 x the model's embed_dim (SLIP's 4096 for ViT-B/16,
    whose embed_dim is 512)."""
    simclr_out_dim: int = 0
    """Output width of the SimCLR projection head; 0: embed_dim / 2 (SLIP's 256 for ViT-B/16)."""
    max_nonfinite_steps: int = 5
    """A step whose loss is NaN/Inf is skipped (no update); this many in a row stop the run with an error."""
    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.2
    """AdamW weight decay (not applied to gains, biases, embeddings or the logit scale)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.98
    """AdamW's second-moment decay (CLIP's 0.98; lower is steadier for large batches, e.g. SigLIP's 0.95)."""
    eps: float = 1e-6
    """AdamW's epsilon, added to the denominator."""
    warmup_steps: int = 100
    """Linear warmup steps before the cosine decay."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value; 0 disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of the forward pass (weights stay fp32). 'auto': bf16 on CUDA devices with bf16 and on
    CPUs with native bf16 (AVX512_BF16/AMX), fp32 otherwise (emulated bf16 is several times slower than fp32).
    The choice is printed at start; the resolved config saved with the run holds the concrete value."""
    workers: int = -1
    """DataLoader worker processes per rank; -1 picks: on a GPU this rank's share of the cores minus one (at most
    16), on the CPU one (the model needs the cores)."""
    image_pipeline: Literal["fast", "open_clip"] = "fast"
    """'fast': decode + random resized crop into uint8 (large JPEGs decoded at reduced scale, torch's antialiased
    uint8 resize), uint8 batches, normalised on the device (in the worker on a CPU). 'open_clip': the model's own PIL train transform (float batches), e.g. for the
    colour-jitter/grey-scale/timm options of an open_clip aug_cfg."""
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    """Fast pipeline: the random resized crop's area fraction range (open_clip's default)."""
    shuffle_buffer: int = 2000
    """Samples held in each worker's shuffle buffer."""
    save_every: int = 500
    """Write a checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Completed checkpoints to keep; older ones are deleted."""
    resume: str = "auto"
    """'auto' continues from the newest complete checkpoint in output_dir, 'never' starts fresh, or a checkpoint path."""
    log_every: int = 10
    """Log metrics every this many steps."""
    curves_every_s: float = 30.0
    """Redraw curves.png (and eval_curves.png) in output_dir from metrics.jsonl at a log step at most every this
    many seconds, and once at the end; 0 disables. Redraw after the fact: python -m training.curves RUN_DIR."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    threads: int = 0
    """torch intra-op threads per rank; 0 picks: on the CPU every core of this rank's share (the loader's worker
    needs little), elsewhere torch's default."""

    def validate(self) -> None:
        for key in ("global_batch_size", "steps", "save_every", "keep_last", "log_every", "accum_steps",
                    "max_nonfinite_steps"):
            _check(getattr(self, key) > 0, f"train.{key} must be > 0, got {getattr(self, key)}")
        _check(self.workers >= -1, f"train.workers must be -1 (pick) or >= 0, got {self.workers}")
        _check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
               f"train.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")
        for key in ("lr", "weight_decay", "warmup_steps", "grad_clip", "threads", "shuffle_buffer",
                    "eval_every", "curves_every_s"):
            _check(getattr(self, key) >= 0, f"train.{key} must be >= 0, got {getattr(self, key)}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _check(self.queue_size >= 0 and 0 <= self.distill_alpha <= 1 and 0 <= self.momentum < 1,
               "train.queue_size must be >= 0, train.distill_alpha in [0, 1] and train.momentum in [0, 1)")
        if self.queue_size or self.distill_alpha:
            _check(self.loss == "clip" and self.accum_steps == 1,
                   "train.queue_size / train.distill_alpha work with train.loss=clip and train.accum_steps=1 "
                   "(the queue already decouples the negatives from the batch)")
        _check(self.simclr_weight >= 0 and self.simclr_temperature > 0 and self.simclr_hidden_dim >= 0
               and self.simclr_out_dim >= 0, "train.simclr_weight, simclr_hidden_dim and simclr_out_dim must be "
                                             ">= 0 and train.simclr_temperature > 0")
        _check(not self.simclr_weight or self.image_pipeline == "fast",
               "train.simclr_weight > 0 needs train.image_pipeline=fast: SimCLR's views are drawn by its decoder")
        _check(self.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {self.device!r}")
        _check(bool(self.resume), "train.resume must be 'auto', 'never' or a checkpoint path")


@dataclass
class StorageConfig:
    """Object storage (s3://, gs://, https://) for every path in the config, passed to fsspec. Credentials are best
    left to each library's own environment (AWS_* variables and ~/.aws for s3fs, GOOGLE_APPLICATION_CREDENTIALS for
    gcsfs); whatever is set here is never printed, logged or written into a run folder, checkpoint or result."""

    endpoint_url: str = ""
    """S3-compatible endpoint (MinIO, Ceph, R2, a loopback server), e.g. http://127.0.0.1:9000; empty: AWS's."""
    profile: str = ""
    """AWS profile name from ~/.aws (s3://); empty: AWS_PROFILE or the default chain."""
    anon: bool = False
    """Anonymous access (public buckets), no credentials sent."""
    region: str = ""
    """S3 region; empty: AWS_REGION / AWS_DEFAULT_REGION or the library's default."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra fsspec options for the object stores (s3://, gs://, az://; e.g. {key: ..., secret: ..., token: ...});
    values of secret-looking keys are dropped from every saved copy of the config. https:// takes none."""
    retries: int = 5
    """Retries of a failed remote read (connection reset, 5xx, throttling, timeout), with exponential backoff; the
    read resumes at the byte where it stopped. A training shard still failing after them is skipped and counted."""
    retry_wait_s: float = 0.5
    """Wait before the first retry; doubled after each failed one (capped at 30 s)."""
    read_ahead_mib: float = 4.0
    """Bytes fetched ahead of the reader per request of a remote shard (a block cache, not a whole-shard download)."""
    cache_dir: str = "~/.cache/clipline"
    """Local folder for the mirror of a remote run folder (runs/...), the staging of checkpoints before upload and
    checkpoints downloaded for resume or eval (checkpoints/...)."""

    def validate(self) -> None:
        _check(self.retries >= 0 and self.retry_wait_s >= 0 and self.read_ahead_mib > 0,
               "storage.retries and storage.retry_wait_s must be >= 0 and storage.read_ahead_mib > 0")


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    """wandb mode; 'disabled' needs no account and writes nothing."""
    project: str = "clipline"
    """wandb project the run is logged to."""
    entity: str = ""
    """wandb team or user; empty: your default entity."""


@dataclass
class EvalDatasetConfig:
    name: str = ""
    """Name of the dataset in results."""
    task: Literal["zeroshot_classification", "retrieval", "linear_probe"] = "zeroshot_classification"
    """What to measure on it: zero-shot classification, image<->text retrieval, or a linear probe on frozen image
    features (logistic regression, regularisation chosen on a validation split)."""
    format: Literal["auto", "shards", "clip_benchmark_wds", "imagefolder", "csv", "torchvision", "flickr",
                    "coco_captions"] = "auto"
    """How the data is stored. 'shards': webdataset tars as `clipline prep` writes them (label in each sample's
    .json, captions one per line in .txt); 'clip_benchmark_wds': CLIP_benchmark's layout (SPLIT/N.tar with .cls or
    .txt, nshards.txt, classnames.txt, zeroshot_classification_templates.txt); 'imagefolder': CLASS/IMAGE trees;
    'csv': a .csv/.tsv file of image paths with a label or caption column; 'torchvision': a torchvision dataset
    already on disk (see torchvision_class); retrieval only, an images folder (path) plus annotation_file:
    'flickr': CLIP_benchmark's flickr30k/flickr8k file (`image,caption` lines, e.g. flickr30k_test_karpathy.txt
    or Kaggle's captions.txt), a Flickr token file (`NAME.jpg#N<TAB>caption`, e.g. Flickr8k.token.txt) or a JSON
    list of {"image": ..., "caption": [...]}; 'coco_captions': a COCO captions JSON (images + annotations, e.g.
    captions_val2017.json, or CLIP_benchmark's coco_test_karpathy.json for mscoco_captions). 'auto' tells them
    apart from what is on disk (from annotation_file's content when it is set)."""
    path: str = ""
    """Where the data is: a folder, a shard brace pattern, a .csv/.tsv file, or a torchvision root. flickr and
    coco_captions: the images folder (CLIP_benchmark's --dataset_root; for COCO a folder holding val2014/ or
    val2017/ also works)."""
    split: str = ""
    """Split to evaluate. clip_benchmark_wds and torchvision: the split name ('' means 'test'); flickr and
    coco_captions: the split in CLIP_benchmark's default annotation file names and in Karpathy-style JSON
    ('' means 'test'); other formats: a subfolder of path ('' means path itself)."""
    annotation_file: str = ""
    """flickr and coco_captions: the captions file (CLIP_benchmark's --annotation_file). '' means CLIP_benchmark's
    default name in path: flickr30k_SPLIT_karpathy.txt, flickr8k_SPLIT_karpathy.txt or coco_SPLIT_karpathy.json."""
    train_path: str = ""
    """Linear probe: where the training data is ('' means path)."""
    train_split: str = ""
    """Linear probe: the training split, read like split ('' means 'train' for clip_benchmark_wds and
    torchvision; for other formats train_path itself)."""
    val_path: str = ""
    """Linear probe: where a validation split is ('' means val_split of train_path, or a part of the train split)."""
    val_split: str = ""
    """Linear probe: a validation split, read like split; with neither val_path nor val_split, a seeded
    eval.linear_probe.val_proportion of the training split is held out."""
    label_field: str = ""
    """Classification: shards: key of the label in each sample's .json (required); csv: the label column
    ('' means 'label'). Not used by the other formats."""
    image_field: str = "path"
    """csv: the column holding image paths (relative paths are relative to the file's folder)."""
    caption_field: str = "caption"
    """csv, retrieval: the caption column; rows with the same image path are one image with several captions."""
    torchvision_class: str = ""
    """torchvision format: the dataset class in torchvision.datasets (e.g. MNIST, CIFAR10, Food101), built with
    root=path and download=False."""
    classnames: list[str] = field(default_factory=list)
    """Classification: class names, in label order. Empty: classnames_file, else what the data holds (the
    dataset's classnames.txt, ImageFolder folder names, a torchvision dataset's classes, a CSV's text labels)."""
    classnames_file: str = ""
    """A text file with one class name per line (blank lines are ignored), or the name of a file shipped in
    configs/eval/classnames/ (e.g. 'cifar10')."""
    label_values: list[str] = field(default_factory=list)
    """Classification: the stored label of each class, when it differs from the class name (e.g. the integer 2
    for the class 'two', or an ImageFolder folder name); empty means the labels are the class names."""
    templates: list[str] = field(default_factory=list)
    """Zero-shot classification: prompt templates; '{c}' is replaced by the class name. Empty: templates_file,
    else the dataset's own template file (clip_benchmark_wds), else OpenAI's 80 ImageNet templates."""
    templates_file: str = ""
    """A text file with one template per line, or the name of a set shipped in configs/eval/templates/
    (e.g. 'imagenet', 'cifar10', 'mnist')."""

    def validate(self) -> None:
        _check(bool(self.name) and bool(self.path), "every eval.datasets entry needs a name and a path")
        _check(self.format != "torchvision" or bool(self.torchvision_class),
               f"eval dataset {self.name!r}: format torchvision needs torchvision_class (e.g. CIFAR10)")
        _check(self.format not in ("flickr", "coco_captions") or self.task == "retrieval",
               f"eval dataset {self.name!r}: format {self.format} holds captions only; set task: retrieval")
        _check(not self.annotation_file or self.format in ("auto", "flickr", "coco_captions"),
               f"eval dataset {self.name!r}: annotation_file is read only by the flickr and coco_captions formats "
               f"(format is {self.format}); remove it or set format")
        if self.task != "retrieval":
            _check(not self.classnames or len(self.classnames) >= 2,
                   f"eval dataset {self.name!r}: needs at least 2 classnames")
            _check(not self.label_values or len(self.label_values) == len(self.classnames),
                   f"eval dataset {self.name!r}: label_values must have one entry per classname")
            _check(all("{c}" in t for t in self.templates),
                   f"eval dataset {self.name!r}: every template must contain '{{c}}' (the class name's place)")


@dataclass
class LinearProbeConfig:
    l2_min: float = 1e-6
    """Smallest L2 penalty (lambda, on the mean cross-entropy) of the sweep."""
    l2_max: float = 1e2
    """Largest L2 penalty of the sweep."""
    grid_points: int = 9
    """Log-spaced penalties tried first, from l2_max down to l2_min."""
    refine_steps: int = 4
    """Then this many rounds of trying halfway (in log space) on either side of the best so far, as in the CLIP
    paper's parametric search."""
    val_proportion: float = 0.2
    """Share of the training split held out for the sweep when the dataset has no validation split."""
    max_iter: int = 300
    """L-BFGS iterations per fit (the problem is convex; fits stop earlier when converged)."""
    seed: int = 0
    """Seed of the train/validation split."""

    def validate(self) -> None:
        _check(0 < self.l2_min <= self.l2_max, "eval.linear_probe: need 0 < l2_min <= l2_max")
        _check(self.grid_points >= 1 and self.refine_steps >= 0 and self.max_iter >= 1,
               "eval.linear_probe: grid_points and max_iter must be >= 1, refine_steps >= 0")
        _check(0 < self.val_proportion < 1, "eval.linear_probe.val_proportion must be in (0, 1)")


@dataclass
class EvalConfig:
    checkpoint: str = "${run.output_dir}/train"
    """What to evaluate: a checkpoint folder, a training run folder (its newest complete checkpoint), an open_clip
    model folder (open_clip_config.json), a Hugging Face CLIP saved on disk (config.json + weights), or
    ARCH:WEIGHTS (an open_clip architecture name or model JSON file, and a local .pt/.bin/.safetensors file)."""
    checkpoints: list[str] = field(default_factory=list)
    """Several of the above, evaluated in turn; when set, checkpoint is ignored."""
    all_steps: bool = False
    """For a training run folder: evaluate every complete checkpoint, not only the newest, and plot each
    metric over training steps."""
    datasets: list[EvalDatasetConfig] = field(default_factory=list)
    """The suite: datasets x tasks."""
    batch_size: int = 256
    """Images (or captions) per forward pass of the encoders."""
    output_dir: str = "${run.output_dir}/eval"
    """results.json, results.csv and results.md (and plots/ for several steps) go here."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of the encoders; similarities and metrics are computed in fp32 whatever this is.
    'auto': as train.precision (bf16 where the device computes it natively, fp32 otherwise); the choice is printed
    at start and saved in results.json (precision, precision_requested) and the saved config.yaml."""
    workers: int = -1
    """Image decoding processes. -1: on a GPU one per core; on the CPU half the cores (the model runs on the
    others). 0 decodes in the main process."""
    progress: bool = True
    """Show progress bars on long work (on a terminal)."""
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    """Settings of the linear-probe task."""

    def validate(self) -> None:
        _check(self.batch_size > 0, "eval.batch_size must be > 0")
        _check(self.workers >= -1, "eval.workers must be -1 (all cores), 0 or more")
        _check(self.device in ("auto", "cpu", "cuda"), f"eval.device must be auto, cpu or cuda, got {self.device!r}")
        self.linear_probe.validate()
        for ds in self.datasets:
            ds.validate()
        names = [ds.name for ds in self.datasets]
        _check(len(names) == len(set(names)), f"eval dataset names must be unique, got {names}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        _check(self.model.init_logit_bias is None or self.train.loss == "siglip",
               "model.init_logit_bias is set but train.loss is 'clip': a bias added to every logit cancels in the "
               "softmax, so it would never train; use it with train.loss=siglip")


# ----------------------------------------------------------------------------------------------------------------
# Building the tree from plain data, with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected null")
    if origin is Literal:
        _check(value in args, f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        _check(isinstance(value, dict), f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        _check(isinstance(value, list), f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{where}: expected a mapping of {_valid_keys(tp)}, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        _check(isinstance(value, bool), f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads '1e-3' (no dot) as a string; accept any string float() understands.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _valid_keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{where + '.' if where else ''}{key}'{hint}; "
                              f"valid keys{' of ' + where if where else ''}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(data: dict, override: str) -> dict:
    key, sep, raw = override.partition("=")
    _check(bool(sep) and bool(key), f"override {override!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: cannot parse value ({e})") from None
    parts = key.split(".")
    if any(part.isdigit() for part in parts):  # a list element: eval.datasets.0.name=x
        return _set_path(data, Config, parts, value, override, "")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return _deep_merge(data, nested)


def _set_path(node: Any, tp: Any, parts: list[str], value: Any, override: str, where: str) -> Any:
    """A copy of ``node`` (plain data of config type ``tp``; None when absent) with ``value`` set at ``parts``, where
    a number addresses an element of a list. A mapping value is merged into a mapping, as top-level overrides are."""
    if not parts:
        return _deep_merge(node, value) if isinstance(node, dict) and isinstance(value, dict) else value
    part, rest = parts[0], parts[1:]
    here = f"{where}.{part}" if where else part
    tp = _unwrap_optional(tp)
    if isinstance(node, list) or typing.get_origin(tp) is list:
        _check(part.isdigit(), f"override {override!r}: {where} is a list: address an element by its index from 0, "
                               f"e.g. {where}.0")
        items, index = list(node or []), int(part)
        if not items:
            raise ConfigError(f"override {override!r}: {where} is empty, so it has no element {index}; set the whole "
                              f"list, e.g. {where}=[...]")
        _check(index < len(items), f"override {override!r}: {where} has {len(items)} "
                                   f"entr{'y' if len(items) == 1 else 'ies'}, so the index must be 0..{len(items) - 1}")
        element_tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        items[index] = _set_path(items[index], element_tp, rest, value, override, here)
        return items
    _check(not part.isdigit() or isinstance(node, dict),
           f"override {override!r}: {where} is not a list, so it takes no index {part}")
    out = dict(node) if isinstance(node, dict) else {}
    child_tp = typing.get_type_hints(tp).get(part) if dataclasses.is_dataclass(tp) else None
    if part not in out and child_tp is not None and rest and rest[0].isdigit():
        out[part] = _plain(getattr(tp(), part))  # a list left at its default: index into the default
    out[part] = _set_path(out.get(part), child_tp, rest, value, override, here)
    return out


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _plain(value: Any) -> Any:
    """Config values as the plain data YAML gives (dataclasses as dicts)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_REF = re.compile(r"\$\{([a-zA-Z_][\w.]*)\}")


def _interpolate(cfg: Config) -> None:
    """Fill ``${section.key}`` references in string fields from other (scalar) fields of the tree."""

    def lookup(path: str, where: str) -> str:
        node: Any = cfg
        for part in path.split("."):
            _check(dataclasses.is_dataclass(node) and hasattr(node, part),
                   f"{where}: reference '${{{path}}}' names no config key")
            node = getattr(node, part)
        _check(isinstance(node, (str, int, float)), f"{where}: reference '${{{path}}}' is not a scalar")
        return str(node)

    def fill(value: str, where: str, depth: int = 0) -> str:
        _check(depth < 10, f"{where}: references form a cycle")
        new = _REF.sub(lambda m: lookup(m.group(1), where), value)
        return fill(new, where, depth + 1) if new != value and _REF.search(new) else new

    def walk(node: Any, where: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            here = f"{where}.{f.name}" if where else f.name
            if isinstance(value, str):
                setattr(node, f.name, fill(value, here))
            elif dataclasses.is_dataclass(value):
                walk(value, here)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if dataclasses.is_dataclass(item):
                        walk(item, f"{here}[{i}]")
                    elif isinstance(item, str):
                        value[i] = fill(item, f"{here}[{i}]")

    walk(cfg, "")


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    _check(p.is_file(), f"config file not found: {p} (pass an existing YAML file, e.g. configs/demo.yaml)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    _check(isinstance(data, dict), f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge YAML ``files`` left to right, apply dotted ``overrides``, resolve references, validate."""
    data: dict = {}
    for path in files:
        data = _deep_merge(data, read_yaml(path))
    for override in overrides:
        data = _apply_override(data, override)
    cfg = _build(Config, data, "")
    if cfg.run.smoke:
        from clipline import smoke  # the shrinking rules, kept out of the schema

        changes = smoke.shrink_settings(cfg)
        _interpolate(cfg)
        smoke.report(changes + smoke.shrink_model(cfg))
    else:
        _interpolate(cfg)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain data of a config (section), with storage credentials dropped: this is what every saved copy holds."""
    data = dataclasses.asdict(cfg)
    if isinstance(data.get("storage"), dict):
        from clipline.storage import redact_options

        data["storage"]["options"] = redact_options(data["storage"]["options"])
    return data


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def config_from_dict(data: dict) -> Config:
    """Rebuild a resolved config (as saved in a run folder or checkpoint)."""
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg

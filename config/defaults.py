"""The one configuration tree of the project: every key, its default, and what it does.

Precedence: these defaults < a ``configs/*.yml`` file < ``KEY VALUE`` pairs on the command line.
``config.load_config`` merges and validates them once, at start-up.
"""
from yacs.config import CfgNode as CN

_C = CN()

# ----------------------------------------------------------------------------- MODEL
_C.MODEL = CN()
_C.MODEL.NAME = "resnet50"  # backbone: resnet18|34|50|101|152, resnet50_ibn_a, resnet101_ibn_a, mobilenet_v2
_C.MODEL.BACKBONE_EMB_SIZE = 2048  # channels out of the backbone (512 for resnet18/34); must match MODEL.NAME
_C.MODEL.LAST_STRIDE = 1  # stride of the last ResNet stage (1 keeps a 16x8 map at 256x128)
_C.MODEL.STEM_RELU = False  # plain ResNets' stem ReLU; False keeps the BoT/original quirk (no ReLU after bn1); IBN-a and mobilenet_v2 ignore it
_C.MODEL.POOLING = "avg"  # global pooling of the backbone's map: avg (the paper's) | gem (generalised mean, fast-reid's stronger baselines)
_C.MODEL.GEM_P = 3.0  # GeM exponent p at the start of training (1 = average pooling; larger weighs a channel's strongest responses more)
_C.MODEL.GEM_P_LEARNED = True  # learn p with the network (the checkpoint holds the value reached); False keeps MODEL.GEM_P
_C.MODEL.PRETRAINED = True  # load MODEL.PRETRAIN_PATH into the backbone when a new model is trained
_C.MODEL.PRETRAIN_PATH = ""  # local weights: ImageNet state dict, or a checkpoint (ONLY_TEST / RESUME_TRAINING)
_C.MODEL.USE_CENTROIDS = False  # inference tools: one mean embedding per identity (evaluation always reports both)
_C.MODEL.KEEP_CAMID_CENTROIDS = True  # camera-aware protocol in both modes: same-id same-camera gallery images removed (False for fashion data)
_C.MODEL.RESUME_TRAINING = False  # continue from MODEL.PRETRAIN_PATH, or the newest checkpoint in OUTPUT_DIR
_C.MODEL.CHANNELS_LAST = "auto"  # channels_last memory format for model and input: auto (on with a GPU) | on | off
_C.MODEL.COMPILE = "auto"  # torch.compile the backbone: auto (on with a GPU) | on | off; skipped with a warning if unavailable

# ----------------------------------------------------------------------------- INPUT
_C.INPUT = CN()
_C.INPUT.SIZE_TRAIN = [256, 128]  # training image size [height, width]
_C.INPUT.SIZE_TEST = [256, 128]  # evaluation image size [height, width]
_C.INPUT.PROB = 0.5  # probability of a horizontal flip
_C.INPUT.RE_PROB = 0.5  # probability of random erasing
_C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]  # per-channel mean used to normalise (RGB, 0..1)
_C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]  # per-channel std used to normalise (RGB, 0..1)
_C.INPUT.PADDING = 10  # zero padding (pixels) before the random crop
_C.INPUT.AUTOAUGMENT_PROB = 0.0  # probability that a training image gets torchvision's ImageNet AutoAugment policy (after the resize); 0 = off, the paper's recipe

# ----------------------------------------------------------------------------- DATASETS
_C.DATASETS = CN()
_C.DATASETS.NAMES = "market1501"  # training dataset in datasets.DATASET_REGISTRY; several, comma-separated (market1501,dukemtmcreid), train on their union
_C.DATASETS.TEST_NAME = ""  # dataset whose query/gallery are evaluated (cross-domain testing); empty: the first of DATASETS.NAMES
_C.DATASETS.ROOT_DIR = "/home/data"  # folder that holds the dataset (see README for each layout)
_C.DATASETS.JSON_TRAIN_PATH = ""  # COCO-ReID train JSON (street2shop, df1)
_C.DATASETS.JSON_QUERY_PATH = ""  # COCO-ReID query JSON; empty: JSON_TRAIN_PATH with 'train' -> 'query' in the file name
_C.DATASETS.JSON_GALLERY_PATH = ""  # COCO-ReID gallery JSON; empty: as above with 'gallery'
_C.DATASETS.ON_BAD_ANNOTATION = "error"  # COCO-ReID bad annotation (missing image, bad box, ...): error | skip (counted)
_C.DATASETS.VERIFY_IMAGES = True  # decode every image at start-up (JPEG at 1/8 scale) so a bad or truncated file fails before training

# ----------------------------------------------------------------------------- DATALOADER
_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = -1  # loader processes; -1 = min(8, CPUs per device) (embedding on a GPU: CPUs - 1)
_C.DATALOADER.SAMPLER = "random_identity"  # PK sampler (the only one)
_C.DATALOADER.NUM_INSTANCE = 4  # K: images per identity in a training batch
_C.DATALOADER.DROP_LAST = True  # unused: the PK sampler only ever yields full P x K batches
_C.DATALOADER.USE_RESAMPLING = True  # fill identities with < K images by resampling (True) or masked mock images (False)
_C.DATALOADER.MOCK_IMAGES = "copy"  # what a masked mock image shows: copy (one of the identity's images) | zeros (the original's blank image, which skews the backbone's BatchNorm statistics); every loss ignores either
_C.DATALOADER.PIN_MEMORY = True  # pinned host memory for faster host-to-GPU copies (ignored on CPU)
_C.DATALOADER.PERSISTENT_WORKERS = True  # keep the loader processes alive between epochs (when NUM_WORKERS > 0)
_C.DATALOADER.PREFETCH_FACTOR = 4  # batches each loader process prepares ahead (when NUM_WORKERS > 0)
_C.DATALOADER.GPU_AUGMENT = "auto"  # train augmentation as batched ops on the device: auto (on with a GPU) | on | off (PIL in the loader)
_C.DATALOADER.CACHE_IMAGES = "auto"  # decode train images once into a uint8 tensor in RAM: auto (GPU, fits CACHE_MAX_GB) | on | off
_C.DATALOADER.CACHE_MAX_GB = 8.0  # RAM budget (GiB) under which CACHE_IMAGES auto caches the train images

# ----------------------------------------------------------------------------- SOLVER
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER_NAME = "Adam"  # Adam or AdamW for the network (the centers always use SGD)
_C.SOLVER.MAX_EPOCHS = 120  # training epochs
_C.SOLVER.BASE_LR = 1e-4  # learning rate after warmup
_C.SOLVER.MIN_LR = 1e-7  # learning rate the cosine schedule decays to, at the end of the last epoch (as torch CosineAnnealingLR)
_C.SOLVER.MOMENTUM = 0.9  # unused (kept for config compatibility with the original)
_C.SOLVER.MARGIN = 0.5  # margin of the triplet and centroid triplet losses
_C.SOLVER.TRIPLET_SOFT_MARGIN = False  # soft-margin triplet (log(1+exp(d_ap-d_an))) instead of MARGIN
_C.SOLVER.DISTANCE_FUNC = "euclidean"  # euclidean | cosine: triplet losses, evaluation and get_similar
_C.SOLVER.CLUSTER_MARGIN = 0.3  # unused (kept for config compatibility with the original)
_C.SOLVER.CENTER_LR = 0.5  # SGD learning rate of the center-loss centers
_C.SOLVER.CENTER_LOSS_WEIGHT = 0.0005  # weight of the center loss in the total loss
_C.SOLVER.WEIGHT_DECAY = 0.0005  # L2 weight decay of the network optimiser
_C.SOLVER.WEIGHT_DECAY_BIAS = 0.0005  # unused (kept for config compatibility with the original)
_C.SOLVER.LR_SCHEDULER_NAME = "multistep_lr"  # multistep_lr | cosine_annealing (both after the warmup)
_C.SOLVER.GAMMA = 0.1  # multistep: factor applied at each of LR_STEPS
_C.SOLVER.LR_STEPS = [40, 70]  # multistep: epochs at which the learning rate is multiplied by GAMMA
_C.SOLVER.USE_WARMUP_LR = True  # linear per-epoch warmup: BASE_LR * (epoch + 1) / WARMUP_EPOCHS
_C.SOLVER.WARMUP_EPOCHS = 10  # epochs of warmup
_C.SOLVER.MONITOR_METRIC_NAME = "mAP"  # metric that picks the best checkpoint: mAP, mINP or rank1/5/10/20/50, centroid_ in front for centroid mode; the final epoch is always weighed
_C.SOLVER.MONITOR_METRIC_MODE = "max"  # max | min for MONITOR_METRIC_NAME
_C.SOLVER.CHECKPOINT_PERIOD = 1  # epochs between refreshes of last.ckpt, which is also written after the final epoch
_C.SOLVER.EVAL_PERIOD = 5  # epochs between evaluations (the final epoch is always evaluated)
_C.SOLVER.MAX_ITERS_PER_EPOCH = 0  # 0 = full epochs; N > 0 caps every epoch at N batches (quick checks)
_C.SOLVER.IMS_PER_BATCH = 64  # P: identities per training batch (images per batch = P x NUM_INSTANCE)
_C.SOLVER.DIST_BACKEND = "ddp"  # multi-device strategy: ddp | ddp_spawn | ddp_find_unused_parameters_true; single-device runs ignore it
_C.SOLVER.QUERY_XENT_WEIGHT = 1.0  # weight of the label-smoothed cross-entropy
_C.SOLVER.QUERY_CONTRASTIVE_WEIGHT = 1.0  # weight of the batch-hard triplet loss
_C.SOLVER.CENTROID_CONTRASTIVE_WEIGHT = 1.0  # weight of the centroid triplet loss (CTL model)
_C.SOLVER.FUSED_OPTIMIZER = "auto"  # fused Adam/AdamW kernels: auto (on with a GPU) | on | off (foreach on a GPU)
_C.SOLVER.USE_AUTOMATIC_OPTIM = False  # must stay False: the training steps use manual optimisation

# ----------------------------------------------------------------------------- TEST
_C.TEST = CN()
_C.TEST.IMS_PER_BATCH = 128  # evaluation batch size (images)
_C.TEST.WEIGHT = ""  # unused (kept for config compatibility; use MODEL.PRETRAIN_PATH)
_C.TEST.FEAT_NORM = True  # L2-normalise embeddings before distances
_C.TEST.NECK_FEAT = "after"  # embedding for evaluation and inference: after (the BNNeck's output, the paper's) | before (the pooled feature the metric losses train)
_C.TEST.FLIP_FEATS = False  # embed each image as the mean of its and its horizontal mirror's features (evaluation and inference; twice the cost)
_C.TEST.ONLY_TEST = False  # evaluate MODEL.PRETRAIN_PATH (a checkpoint) and exit
_C.TEST.RE_RANKING = False  # k-reciprocal re-ranking of the standard mode (k1=20, k2=6, lambda=0.3)
_C.TEST.QUERY_EXPANSION_K = 0  # > 0: also report the standard mode with alpha-weighted average query expansion over this many gallery neighbours (fast-reid: 5); 0 = off
_C.TEST.QUERY_EXPANSION_ALPHA = 3.0  # weight of a neighbour: max(cosine similarity, 0) ** alpha (0: plain average)
_C.TEST.VISUALIZE = False  # write ranked-list images and index.html under OUTPUT_DIR/visrank ('yes'/'no' accepted)
_C.TEST.VISUALIZE_TOPK = 10  # gallery items shown per query
_C.TEST.VISUALIZE_MAX_NUMBER = 1000000  # at most this many queries drawn

# ----------------------------------------------------------------------------- MISC
_C.GPU_IDS = [0]  # GPUs to use; without a GPU the run falls back to the CPU with a warning
_C.ACCELERATOR = "auto"  # auto | gpu | cpu
_C.DEVICES = 0  # number of devices (processes); 0 = len(GPU_IDS) on GPU, 1 on CPU
_C.NUM_NODES = 1  # machines in a multi-node run
_C.LOG_DIR = "logs"  # unused when OUTPUT_DIR is set; otherwise runs go to LOG_DIR/<DATASETS.NAMES, joined by +>
_C.USE_MIXED_PRECISION = True  # autocast on GPU (ignored on CPU)
_C.MIXED_PRECISION_DTYPE = "bf16"  # bf16 | fp16 for USE_MIXED_PRECISION
_C.OUTPUT_DIR = ""  # checkpoints, TensorBoard logs, metrics.json
_C.PROGRESS_BAR = "auto"  # training progress: auto (a bar on a terminal, one log line per epoch otherwise: batch logs) | on | off
_C.REPRODUCIBLE = False  # seed every run from REPRODUCIBLE_SEED (+ run index); False draws a fresh seed per run
_C.REPRODUCIBLE_NUM_RUNS = 3  # independent training runs (run_<i> folders, mean metrics at the top)
_C.REPRODUCIBLE_SEED = 0  # first seed when REPRODUCIBLE is True


def get_cfg_defaults() -> CN:
    """A fresh copy of the defaults (never mutate ``_C`` itself)."""
    return _C.clone()

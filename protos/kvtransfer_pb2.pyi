from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayout(_message.Message):
    __slots__ = ("model_fingerprint", "dtype", "num_layers", "num_kv_heads", "head_dim", "page_size", "tp_size", "cp_size")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    CP_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    tp_size: int
    cp_size: int
    def __init__(self, model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., page_size: _Optional[int] = ..., tp_size: _Optional[int] = ..., cp_size: _Optional[int] = ...) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("backend", "host_id", "device", "device_uuid", "sender_id", "cuda_ipc_pool", "nccl_store")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_POOL_FIELD_NUMBER: _ClassVar[int]
    NCCL_STORE_FIELD_NUMBER: _ClassVar[int]
    backend: str
    host_id: str
    device: str
    device_uuid: str
    sender_id: str
    cuda_ipc_pool: bytes
    nccl_store: str
    def __init__(self, backend: _Optional[str] = ..., host_id: _Optional[str] = ..., device: _Optional[str] = ..., device_uuid: _Optional[str] = ..., sender_id: _Optional[str] = ..., cuda_ipc_pool: _Optional[bytes] = ..., nccl_store: _Optional[str] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("layout", "peer")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    layout: KVLayout
    peer: PeerInfo
    def __init__(self, layout: _Optional[_Union[KVLayout, _Mapping]] = ..., peer: _Optional[_Union[PeerInfo, _Mapping]] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("receiver", "peer")
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    receiver: KVLayout
    peer: PeerInfo
    def __init__(self, receiver: _Optional[_Union[KVLayout, _Mapping]] = ..., peer: _Optional[_Union[PeerInfo, _Mapping]] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("transfer_id", "layout_digest", "num_pages", "num_tokens", "sender_id", "src_page_ids")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    layout_digest: str
    num_pages: int
    num_tokens: int
    sender_id: str
    src_page_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, transfer_id: _Optional[str] = ..., layout_digest: _Optional[str] = ..., num_pages: _Optional[int] = ..., num_tokens: _Optional[int] = ..., sender_id: _Optional[str] = ..., src_page_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KVData(_message.Message):
    __slots__ = ("layer", "first_page", "num_pages", "kv")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    layer: int
    first_page: int
    num_pages: int
    kv: bytes
    def __init__(self, layer: _Optional[int] = ..., first_page: _Optional[int] = ..., num_pages: _Optional[int] = ..., kv: _Optional[bytes] = ...) -> None: ...

class KVCommit(_message.Message):
    __slots__ = ("first_token_id", "first_logprob")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprob: _common_pb2.TokenLogprob
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "data", "commit")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    data: KVData
    commit: KVCommit
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., data: _Optional[_Union[KVData, _Mapping]] = ..., commit: _Optional[_Union[KVCommit, _Mapping]] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("transfer_id", "num_bytes")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    num_bytes: int
    def __init__(self, transfer_id: _Optional[str] = ..., num_bytes: _Optional[int] = ...) -> None: ...

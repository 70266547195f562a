from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "max_tokens", "stop", "stop_token_ids", "ignore_eos", "logprobs", "skip_special_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens", "logit_bias")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    skip_special_tokens: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    min_p: float
    min_tokens: int
    logit_bias: _containers.ScalarMap[int, float]
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., skip_special_tokens: _Optional[bool] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., min_p: _Optional[float] = ..., min_tokens: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top_token_ids", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class TimingMarks(_message.Message):
    __slots__ = ("decode_received_ns", "decode_admitted_ns", "prefill_received_ns", "prefill_started_ns", "prefill_done_ns", "transfer_done_ns", "first_decode_token_ns", "finished_ns", "transfer_started_ns")
    DECODE_RECEIVED_NS_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADMITTED_NS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_RECEIVED_NS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_STARTED_NS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DONE_NS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_DONE_NS_FIELD_NUMBER: _ClassVar[int]
    FIRST_DECODE_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_NS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_STARTED_NS_FIELD_NUMBER: _ClassVar[int]
    decode_received_ns: int
    decode_admitted_ns: int
    prefill_received_ns: int
    prefill_started_ns: int
    prefill_done_ns: int
    transfer_done_ns: int
    first_decode_token_ns: int
    finished_ns: int
    transfer_started_ns: int
    def __init__(self, decode_received_ns: _Optional[int] = ..., decode_admitted_ns: _Optional[int] = ..., prefill_received_ns: _Optional[int] = ..., prefill_started_ns: _Optional[int] = ..., prefill_done_ns: _Optional[int] = ..., transfer_done_ns: _Optional[int] = ..., first_decode_token_ns: _Optional[int] = ..., finished_ns: _Optional[int] = ..., transfer_started_ns: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("role", "num_total_pages", "num_free_pages", "num_cached_pages", "page_size", "num_running", "num_waiting", "num_held_pages", "num_pending_transfers", "max_num_seqs", "kv_bytes_transferred", "rss_bytes", "num_evictable_pages", "cpu_seconds")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_HELD_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_PENDING_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTABLE_PAGES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    role: str
    num_total_pages: int
    num_free_pages: int
    num_cached_pages: int
    page_size: int
    num_running: int
    num_waiting: int
    num_held_pages: int
    num_pending_transfers: int
    max_num_seqs: int
    kv_bytes_transferred: int
    rss_bytes: int
    num_evictable_pages: int
    cpu_seconds: float
    def __init__(self, role: _Optional[str] = ..., num_total_pages: _Optional[int] = ..., num_free_pages: _Optional[int] = ..., num_cached_pages: _Optional[int] = ..., page_size: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_held_pages: _Optional[int] = ..., num_pending_transfers: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., kv_bytes_transferred: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., num_evictable_pages: _Optional[int] = ..., cpu_seconds: _Optional[float] = ...) -> None: ...

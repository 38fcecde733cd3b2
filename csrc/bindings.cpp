// Python bindings of the native core (module deepspeed_fuyou._C). Deliberately thin: the Python package turns
// these results into FuyouIOError / FuyouConfigError and owns every policy decision.
#include <torch/extension.h>

#include "fuyou/async_queue.h"
#include "fuyou/checksums.h"
#include "fuyou/engine.h"
#include "fuyou/host_allocator.h"
#include "fuyou/pinned_pool.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

// The engine needs the address of contiguous host memory; the tensor itself rides along in the request so that
// its memory outlives the transfer even if Python drops every reference first.
std::shared_ptr<fuyou::Request> submit(fuyou::Engine& engine, bool is_write, const std::vector<std::string>& paths,
                                       int64_t stripe_size, const torch::Tensor& tensor, int64_t file_offset) {
  TORCH_CHECK(tensor.device().is_cpu(), "the I/O engine moves host memory; got a tensor on ", tensor.device());
  TORCH_CHECK(tensor.is_contiguous(), "the I/O engine needs a contiguous tensor");
  auto keep_alive = std::shared_ptr<void>(new torch::Tensor(tensor),
                                          [](void* t) { delete static_cast<torch::Tensor*>(t); });
  char* buf = static_cast<char*>(tensor.data_ptr());
  int64_t nbytes = static_cast<int64_t>(tensor.nbytes());
  py::gil_scoped_release release;
  return engine.submit(is_write ? fuyou::Op::kWrite : fuyou::Op::kRead, paths, stripe_size, buf, nbytes, file_offset,
                       std::move(keep_alive));
}

py::object error_tuple(const fuyou::Request& req) {
  std::optional<fuyou::IOError> err = req.error();
  if (!err) return py::none();
  return py::make_tuple(err->err, err->path, err->offset, err->nbytes, err->what);
}

py::object acquire(const std::shared_ptr<fuyou::PinnedPool>& pool, int64_t nbytes, double timeout_s) {
  void* ptr;
  {
    py::gil_scoped_release release;
    ptr = pool->acquire(nbytes, timeout_s);
  }
  if (!ptr) return py::none();
  // The tensor's deleter returns the block: a buffer is back in the pool exactly when its last view is gone.
  std::shared_ptr<fuyou::PinnedPool> owner = pool;
  torch::Tensor t = torch::from_blob(
      ptr, {nbytes}, [owner](void* p) { owner->release(p); }, torch::TensorOptions().dtype(torch::kUInt8));
  return py::cast(t);
}

py::dict stats_dict(const fuyou::PinnedPool& pool) {
  fuyou::PoolStats s = pool.stats();
  return py::dict("budget"_a = s.budget, "reserved"_a = s.reserved, "in_use"_a = s.in_use,
                  "peak_reserved"_a = s.peak_reserved, "peak_in_use"_a = s.peak_in_use, "locked"_a = s.locked,
                  "allocations"_a = s.allocations, "evictions"_a = s.evictions,
                  "pieces_unmapped"_a = s.pieces_unmapped, "waits"_a = s.waits,
                  "lock_mode"_a = s.lock_mode);
}

py::dict host_cache_stats(const fuyou::HostBlockCache& cache) {
  fuyou::HostCacheStats s = cache.stats();
  return py::dict("in_use"_a = s.in_use, "idle"_a = s.idle, "peak_in_use"_a = s.peak_in_use,
                  "mappings"_a = s.mappings, "reuses"_a = s.reuses, "evictions"_a = s.evictions);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deepspeed-fuyou native core: O_DIRECT async file I/O engine and pinned buffer pool";
  m.attr("ALIGNMENT") = fuyou::kAlign;
  m.attr("BOUNCE_BLOCKS_PER_WORKER") = fuyou::kBounceBlocksPerWorker;
  m.def("io_uring_compiled", &fuyou::io_uring_compiled);
  m.def("cuda_compiled", &fuyou::cuda_compiled);
  m.def("crc32c", [](const py::bytes& data) {
    std::string_view view = data;
    return fuyou::crc32c(view.data(), static_cast<int64_t>(view.size()));
  });
  m.def("crc32c", [](const torch::Tensor& tensor) {
    TORCH_CHECK(tensor.device().is_cpu() && tensor.is_contiguous(), "crc32c needs a contiguous host tensor");
    const char* data = static_cast<const char*>(tensor.data_ptr());
    int64_t nbytes = static_cast<int64_t>(tensor.nbytes());
    py::gil_scoped_release release;
    return fuyou::crc32c(data, nbytes);
  });
  m.def("host_cache_size_class", &fuyou::HostBlockCache::size_class);
  m.def("install_host_allocator", [] { fuyou::install_host_allocator(); });
  m.def("host_allocator_installed", &fuyou::host_allocator_installed);
  m.def("host_cache_stats", [] {
    return fuyou::host_allocator_installed() ? host_cache_stats(fuyou::install_host_allocator()) : py::dict();
  });

  py::class_<fuyou::Request, std::shared_ptr<fuyou::Request>>(m, "Request")
      .def("wait", &fuyou::Request::wait, "timeout_s"_a = -1.0, py::call_guard<py::gil_scoped_release>())
      .def("done", &fuyou::Request::done)
      .def("error", &error_tuple)
      .def_property_readonly("used_buffered_fallback", &fuyou::Request::used_buffered_fallback)
      .def_property_readonly("nbytes", &fuyou::Request::nbytes)
      .def_property_readonly("submitted_ns", &fuyou::Request::submitted_ns)
      .def_property_readonly("finished_ns", &fuyou::Request::finished_ns);

  // Destroying an engine joins its workers, which finish every queued transfer first: do that without the GIL.
  py::class_<fuyou::Engine, std::shared_ptr<fuyou::Engine>>(m, "Engine")
      .def(py::init([](const std::string& backend, int64_t block_size, int queue_depth, int threads,
                       bool buffered_fallback, bool verify) {
             return std::shared_ptr<fuyou::Engine>(
                 new fuyou::Engine(
                     fuyou::EngineOptions{backend, block_size, queue_depth, threads, buffered_fallback, verify}),
                 [](fuyou::Engine* e) {
                   py::gil_scoped_release release;
                   delete e;
                 });
           }),
           "backend"_a, "block_size"_a, "queue_depth"_a, "threads"_a, "buffered_fallback"_a, "verify"_a)
      .def("submit", &submit, "is_write"_a, "paths"_a, "stripe_size"_a, "tensor"_a, "file_offset"_a)
      .def("forget_checksums", &fuyou::Engine::forget_checksums, "path"_a)
      .def_property_readonly("checksummed_bytes", &fuyou::Engine::checksummed_bytes)
      .def_property_readonly("backend", [](const fuyou::Engine& e) { return e.options().backend; })
      .def_property_readonly("bytes_read", &fuyou::Engine::bytes_read)
      .def_property_readonly("bytes_written", &fuyou::Engine::bytes_written)
      .def_property_readonly("bounce_bytes", &fuyou::Engine::bounce_bytes);

  py::class_<fuyou::PinnedPool, std::shared_ptr<fuyou::PinnedPool>>(m, "PinnedPool")
      .def(py::init<int64_t, const std::string&>(), "budget"_a, "lock_mode"_a = "auto")
      .def("acquire", &acquire, "nbytes"_a, "timeout_s"_a)
      .def("trim", &fuyou::PinnedPool::trim)
      .def("room_for", &fuyou::PinnedPool::room_for, "nbytes"_a)
      .def("stats", &stats_dict);
}

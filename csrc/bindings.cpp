// torch_ellm._C: the Python face of the core. Thin: argument conversion,
// error translation, GIL release around anything that may block.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "allocator_api.h"
#include "dlpack.h"
#include "host_buffer.h"
#include "pool.h"
#include "virtual_tensor.h"

namespace py = pybind11;
using namespace ellm;

namespace {

// Python exception classes, set by torch_ellm/__init__.py so that OOM is a torch.OutOfMemoryError.
py::object oom_error, released_error, backend_error;

struct View {
  std::shared_ptr<void> owner;  // a VirtualTensor or HostBuffer: keeps the bytes there while torch uses them
  void (*drop)(void* owner, size_t start, size_t end);
  size_t start, end;
  std::vector<int64_t> shape;
  dlpack::ManagedTensor managed;
};

void delete_view(dlpack::ManagedTensor* m) {
  auto* v = static_cast<View*>(m->manager_ctx);
  v->drop(v->owner.get(), v->start, v->end);
  delete v;
}

// A DLPack capsule over bytes [offset, ...) of owner (anything with data_ptr, add_view and drop_view).
template <class Owner>
py::capsule make_view(const std::shared_ptr<Owner>& owner, size_t offset, std::vector<int64_t> shape,
                      uint8_t code, uint8_t bits, int device_type, int device_id) {
  size_t end = bits / 8;
  for (int64_t d : shape) {
    if (d < 0) throw InvalidArgument("negative dimension in shape");
    if (__builtin_mul_overflow(end, static_cast<size_t>(d), &end))
      throw InvalidArgument("view shape is larger than the address space");
  }
  if (__builtin_add_overflow(end, offset, &end)) throw InvalidArgument("view offset is past the address space");
  {
    py::gil_scoped_release nogil;
    owner->add_view(offset, end);
  }
  auto drop = [](void* o, size_t start, size_t end) { static_cast<Owner*>(o)->drop_view(start, end); };
  auto* v = new View{owner, drop, offset, end, std::move(shape), {}};
  v->managed.dl_tensor = {reinterpret_cast<void*>(owner->data_ptr() + offset),
                          {device_type, device_id},
                          static_cast<int32_t>(v->shape.size()),
                          {code, bits, 1},
                          v->shape.data(),
                          nullptr,
                          0};
  v->managed.manager_ctx = v;
  v->managed.deleter = delete_view;
  return py::capsule(&v->managed, "dltensor", [](PyObject* cap) {
    // Only an unconsumed capsule still owns the view; torch renames it once it takes over.
    if (PyCapsule_IsValid(cap, "dltensor")) {
      auto* m = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
      m->deleter(m);
    }
  });
}

std::shared_ptr<Pool> make_pool(const std::string& backend, int device, size_t budget, size_t host_budget,
                                size_t chunk_bytes, size_t granularity, bool park_host) {
  std::unique_ptr<Backend> b = make_backend(backend, device, granularity);
  if (chunk_bytes == 0) chunk_bytes = default_chunk_bytes(*b);
  return std::make_shared<Pool>(std::move(b), chunk_bytes, budget, host_budget, park_host);
}

// Wraps a Python callable so copies and destruction never touch Python refcounts without the GIL.
template <typename R, typename... Args>
std::function<R(Args...)> from_python(py::function f) {
  auto held = std::shared_ptr<py::function>(new py::function(std::move(f)), [](py::function* p) {
    if (!Py_IsInitialized()) return;  // at process exit, after Python: leak rather than crash
    py::gil_scoped_acquire gil;
    delete p;
  });
  return [held](Args... args) -> R {
    py::gil_scoped_acquire gil;
    return (*held)(args...).template cast<R>();
  };
}

// A getter that may wait on a tensor's lock: the holder may need the GIL for a consumer callback.
template <typename R>
auto without_gil(R (VirtualTensor::*get)() const) {
  return [get](const VirtualTensor& v) {
    py::gil_scoped_release nogil;
    return (v.*get)();
  };
}

py::dict event_dict(const Event& e) {
  py::dict d, tags;
  d["t"] = e.t;
  d["kind"] = e.kind;
  d["bytes"] = e.bytes;
  d["seconds"] = e.seconds;
  d["device_bytes"] = e.device_bytes;
  d["host_bytes"] = e.host_bytes;
  for (int i = 0; i < kNumTags; ++i) tags[tag_name(static_cast<Tag>(i))] = e.tag_bytes[i];
  d["tag_bytes"] = tags;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_ellm core: backends, pool, virtual tensors";
  using release_gil = py::call_guard<py::gil_scoped_release>;

  m.def("_set_error_classes", [](py::object oom, py::object released, py::object backend) {
    oom_error = oom;
    released_error = released;
    backend_error = backend;
  });
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OutOfMemory& e) {
      PyErr_SetString(oom_error ? oom_error.ptr() : PyExc_MemoryError, e.what());
    } catch (const UseAfterRelease& e) {
      PyErr_SetString(released_error ? released_error.ptr() : PyExc_RuntimeError, e.what());
    } catch (const BackendError& e) {
      PyErr_SetString(backend_error ? backend_error.ptr() : PyExc_RuntimeError, e.what());
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  py::class_<Capabilities>(m, "Capabilities")
      .def_readonly("virtual_memory", &Capabilities::virtual_memory)
      .def_readonly("host_chunks", &Capabilities::host_chunks)
      .def_readonly("host_location", &Capabilities::host_location)
      .def_readonly("device_name", &Capabilities::device_name);

  py::class_<Pool, std::shared_ptr<Pool>>(m, "Pool")
      .def(py::init(&make_pool), py::arg("backend"), py::arg("device"), py::arg("budget_bytes"),
           py::arg("host_budget_bytes"), py::arg("chunk_bytes"), py::arg("granularity"), py::arg("park_host") = false, release_gil())
      .def_property_readonly("chunk_bytes", &Pool::chunk_bytes)
      .def_property_readonly("parks_host", &Pool::parks_host)
      .def_property_readonly("mapped_device_bytes", &Pool::mapped_device_bytes)
      .def_property_readonly("borrowed_bytes", &Pool::borrowed_bytes)
      .def_property_readonly("host_buffer_bytes", &Pool::host_buffer_bytes)
      .def_property_readonly("backend_name", [](Pool& p) { return p.backend().name(); })
      .def_property_readonly("device", [](Pool& p) { return p.backend().device(); })
      .def_property_readonly("granularity", [](Pool& p) { return p.backend().granularity(); })
      .def("capabilities", [](Pool& p) { return p.backend().capabilities(); })
      .def("virtual_tensor",
           [](std::shared_ptr<Pool> p, size_t max_bytes, const std::string& tag) {
             return std::make_shared<VirtualTensor>(p, max_bytes, parse_tag(tag));
           },
           release_gil())
      .def("host_buffer",
           [](std::shared_ptr<Pool> p, size_t nbytes, const std::string& tag, bool optional) {
             return std::make_shared<HostBuffer>(p, nbytes, parse_tag(tag), optional);
           },
           py::arg("nbytes"), py::arg("tag") = "kv", py::arg("optional") = false, release_gil())
      .def("trim", &Pool::trim, release_gil())
      .def("set_budget", &Pool::set_budget, release_gil())
      .def("set_host_budget", &Pool::set_host_budget, release_gil())
      .def_property_readonly("budget_bytes", &Pool::budget)
      .def_property_readonly("host_budget_bytes", &Pool::host_budget)
      .def("borrow", &Pool::borrow, release_gil())
      .def("return_borrowed", &Pool::return_borrowed, release_gil())
      .def("stats", &Pool::stats, release_gil())
      .def("releasable_bytes", &Pool::releasable_bytes, release_gil())
      .def("stats_by_tag", &Pool::stats_by_tag, release_gil())
      .def("events",
           [](Pool& p) {
             std::vector<Event> ev;
             {
               py::gil_scoped_release nogil;
               ev = p.events();
             }
             py::list out;
             for (auto& e : ev) out.append(event_dict(e));
             return out;
           })
      .def("set_event_capacity", &Pool::set_event_capacity)
      .def("add_consumer",
           [](Pool& p, std::string name, int priority, py::function shrink, py::function releasable) {
             return p.add_consumer(std::move(name), priority, from_python<size_t, size_t>(std::move(shrink)),
                                   from_python<size_t>(std::move(releasable)));
           })
      .def("remove_consumer", &Pool::remove_consumer)
      .def("get_policy",
           [](Pool& p) {
             Policy pol = p.policy();
             py::dict d, borrow;
             for (int i = 0; i < kNumTags; ++i) borrow[tag_name(static_cast<Tag>(i))] = pol.borrow[i];
             d["borrow"] = borrow;
             d["keep_free_bytes"] = pol.keep_free_bytes;
             return d;
           })
      .def("set_policy", [](Pool& p, const std::map<std::string, bool>& borrow, size_t keep_free_bytes) {
        Policy pol = p.policy();
        for (auto& kv : borrow) pol.borrow[static_cast<int>(parse_tag(kv.first))] = kv.second;
        pol.keep_free_bytes = keep_free_bytes;
        p.set_policy(pol);
      });

  // The caching allocator behind enable(): one per device, made on first use.
  m.def("configure_allocator",
        [](std::string backend, size_t budget, double fraction, size_t host_budget, size_t chunk, size_t granularity) {
          configure_allocators({std::move(backend), budget, fraction, host_budget, chunk, granularity});
        });
  m.def("allocator_pool", [](int device) { return allocator_for(device, true)->pool(); }, release_gil());
  m.def("allocator_stats", [](int device) { return allocator_for(device, true)->stats(); }, release_gil());
  m.def("allocator_reset_peak_stats", [](int device) { allocator_for(device, true)->reset_peak_stats(); });
  m.def("allocator_empty_cache", &empty_cache_and_trim, release_gil());
  m.def("allocator_devices", &active_devices);
  m.def("allocator_grant_access",
        [](uintptr_t ptr, int device, int peer) { allocator_for(device, true)->grant_access(reinterpret_cast<void*>(ptr), peer); },
        release_gil());
  m.def("allocator_record_stream",
        [](uintptr_t ptr, int device, uintptr_t stream) {
          allocator_for(device, true)->record_stream(reinterpret_cast<void*>(ptr), stream);
        });
  m.def("set_tag", [](const std::string& tag) { set_current_tag(parse_tag(tag)); });
  m.def("get_tag", [] { return std::string(tag_name(get_current_tag())); });
  m.def("set_oom_thrower", [](uintptr_t fn) { set_oom_thrower(reinterpret_cast<OomThrower>(fn)); });

  py::class_<VirtualTensor, std::shared_ptr<VirtualTensor>>(m, "VirtualTensor")
      .def("resize", &VirtualTensor::resize, py::arg("nbytes"), py::arg("may_deflate") = true, release_gil())
      .def("try_resize", &VirtualTensor::try_resize, release_gil())
      .def("release", &VirtualTensor::release, release_gil())
      .def("data_ptr", &VirtualTensor::data_ptr)
      .def_property_readonly("nbytes", without_gil(&VirtualTensor::nbytes))
      .def_property_readonly("mapped_bytes", without_gil(&VirtualTensor::mapped_bytes))
      .def_property_readonly("max_bytes", &VirtualTensor::max_bytes)
      .def_property_readonly("host_bytes", without_gil(&VirtualTensor::host_bytes))
      .def_property_readonly("released", &VirtualTensor::released)
      .def_property_readonly("tag", [](VirtualTensor& v) { return tag_name(v.tag()); })
      .def_property_readonly("live_views", &VirtualTensor::live_views)
      .def("chunk_locations",
           [](VirtualTensor& v) {
             std::vector<std::string> out;
             py::gil_scoped_release nogil;  // the tensor's lock may be held by a thread that needs the GIL
             for (auto l : v.chunk_locations()) out.push_back(location_name(l));
             return out;
           })
      .def("offload", &VirtualTensor::offload, release_gil())
      .def("prefetch", &VirtualTensor::prefetch, release_gil())
      .def("grant_access", &VirtualTensor::grant_access, release_gil())
      .def("pin", &VirtualTensor::pin, release_gil())
      .def("unpin", &VirtualTensor::unpin)
      .def("_view", &make_view<VirtualTensor>);

  py::class_<HostBuffer, std::shared_ptr<HostBuffer>>(m, "HostBuffer")
      .def("release", &HostBuffer::release, release_gil())
      .def("data_ptr", &HostBuffer::data_ptr)
      .def_property_readonly("nbytes", &HostBuffer::nbytes)
      .def_property_readonly("released", &HostBuffer::released)
      .def_property_readonly("tag", [](HostBuffer& b) { return tag_name(b.tag()); })
      .def("_view", &make_view<HostBuffer>);
}

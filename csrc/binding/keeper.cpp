// The pool's keeper: how its creator starts it, and what runs in it.
//
// Started with posix_spawn, not fork: glibc's posix_spawn shares the
// parent's memory until exec (CLONE_VM | CLONE_VFORK), so the keeper never
// holds a copy-on-write snapshot of the creator's heap or of its mappings of
// pool memory, and runs none of the creator's atfork handlers (ours would
// reserve a pool slot for it). A thread of the creator waits for the exec
// (start_keeper), and nobody waits for the keeper's Python start-up.
//
// The keeper is a child of its creator. It ends only once the pool is
// removed, and the pool outlives its creator's membership, so in practice it
// never exits while its creator is still attached: nobody waits for it, and
// when the creator exits it passes to init (or the nearest subreaper), which
// reaps it. Only if it is killed by hand while the creator runs does it
// stay a zombie until the creator exits, and a wait() for any child in the
// creator may then return it (docs/faq.md).

#include "binding/keeper.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "binding/pool_logging.hpp"
#include "binding/py_errors.hpp"
#include "core/keeper.hpp"

extern char** environ;

namespace pyb {
namespace {

// What the keeper's interpreter runs: load pyarraypool._keeper from this
// extension's file and watch the pool. argv: this file, token, instance.
// Its second line is for Python 3.10, which has no -P (start_keeper): there
// `-c` puts the current directory ('') first on sys.path, and it goes before
// the first import. Under -P nothing is put there and the line does nothing.
constexpr const char* kKeeperCode =
    "import sys\n"
    "if sys.path[:1] == ['']: del sys.path[0]\n"
    "from importlib.machinery import ExtensionFileLoader, ModuleSpec\n"
    "name = 'pyarraypool._keeper'\n"
    "loader = ExtensionFileLoader(name, sys.argv[1])\n"
    "keeper = loader.create_module(ModuleSpec(name, loader, origin=sys.argv[1]))\n"
    "loader.exec_module(keeper)\n"
    "keeper.run(sys.argv[2], sys.argv[3])\n";

// The name the keeper takes once it watches the pool (ps, /proc/PID/comm).
constexpr const char* kKeeperName = "pap-keeper";

// Signals that reach a whole process group, session or terminal: what a
// scheduler cancelling a job, Ctrl-C or a closed terminal sends. The keeper
// must outlive them to clean up after the processes they kill.
void keeper_signals(sigset_t* set) {
  sigemptyset(set);
  sigaddset(set, SIGINT);
  sigaddset(set, SIGTERM);
  sigaddset(set, SIGHUP);
}

// A Python str attribute as a file system path; empty if it is not one.
std::string fs_path(PyObject* str) {
  if (!str || !PyUnicode_Check(str)) return {};
  OwnedRef bytes = OwnedRef::steal(PyUnicode_EncodeFSDefault(str));
  if (!bytes) {
    PyErr_Clear();
    return {};
  }
  return PyBytes_AS_STRING(bytes.get());
}

// Frees posix_spawn's attribute and file action objects at scope end.
struct SpawnSetup {
  posix_spawnattr_t attr;
  posix_spawn_file_actions_t actions;
  int error = 0;
  bool attr_made = false, actions_made = false;
  SpawnSetup() {
    error = posix_spawnattr_init(&attr);
    attr_made = error == 0;
    if (!error) error = posix_spawn_file_actions_init(&actions);
    actions_made = attr_made && error == 0;
  }
  ~SpawnSetup() {
    if (actions_made) posix_spawn_file_actions_destroy(&actions);
    if (attr_made) posix_spawnattr_destroy(&attr);
  }
  SpawnSetup(const SpawnSetup&) = delete;
  SpawnSetup& operator=(const SpawnSetup&) = delete;
  void step(int e) {
    if (!error) error = e;
  }
};

// Spawns `argv` (argv[0] is the executable) as the keeper: its own session
// (a signal to the program's group or session does not reach it), the
// group signals blocked from its first instruction (it ignores them once
// running), /dev/null as stdin, stdout and stderr (it prints nothing, and
// holds no pipe of the program's open: a reader waiting for the program's
// end of output is not kept waiting), no other descriptor, "/" as its
// working directory. No GIL needed. Returns 0 or an errno value.
int spawn_keeper(const std::vector<std::string>& argv, const std::vector<std::string>& env,
                 pid_t* pid) {
  SpawnSetup s;
  if (s.error) return s.error;
  s.step(posix_spawn_file_actions_addopen(&s.actions, 0, "/dev/null", O_RDONLY, 0));
  s.step(posix_spawn_file_actions_addopen(&s.actions, 1, "/dev/null", O_WRONLY, 0));
  s.step(posix_spawn_file_actions_adddup2(&s.actions, 1, 2));
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 34)
  s.step(posix_spawn_file_actions_addclosefrom_np(&s.actions, 3));
#endif
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 29)
  s.step(posix_spawn_file_actions_addchdir_np(&s.actions, "/"));
#endif
  sigset_t blocked;
  keeper_signals(&blocked);
  s.step(posix_spawnattr_setsigmask(&s.attr, &blocked));
  short flags = POSIX_SPAWN_SETSIGMASK;
#ifdef POSIX_SPAWN_SETSID
  flags |= POSIX_SPAWN_SETSID;  // else the keeper calls setsid() itself
#endif
  s.step(posix_spawnattr_setflags(&s.attr, flags));
  if (s.error) return s.error;
  std::vector<char*> args, envp;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  return posix_spawn(pid, argv[0].c_str(), &s.actions, &s.attr, args.data(), envp.data());
}

// The program's environment without the PYTHON* variables, which could
// slow the keeper down or make it print (PYTHONDEVMODE, PYTHONTRACEMALLOC,
// PYTHONWARNINGS, PYTHONSTARTUP with PYTHONINSPECT...) or shadow a module it
// imports (PYTHONPATH), except PYTHONHOME, without which a relocated Python
// may not start. (-I would drop PYTHONHOME too.)
std::vector<std::string> keeper_environment() {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e)
    if (std::strncmp(*e, "PYTHON", 6) != 0 || std::strncmp(*e, "PYTHONHOME=", 11) == 0)
      env.emplace_back(*e);
  return env;
}

// The keeper being spawned by a thread of this process (start_keeper);
// read and written with the GIL held. The thread, once done, waits to be
// joined before the next fork or at exit (finish_keeper_start); in a fork
// child, where it does not exist, this is left alone.
struct Spawning {
  pthread_t thread;
  pid_t spawner;  // the process whose thread it is
  std::vector<std::string> argv, env;
};
Spawning* g_spawning = nullptr;

void* spawn_thread(void* arg) {
  auto* s = static_cast<Spawning*>(arg);
  pid_t pid;
  spawn_keeper(s->argv, s->env, &pid);
  return nullptr;
}

}  // namespace

void finish_keeper_start() noexcept {
  Spawning* s = g_spawning;
  if (!s || s->spawner != ::getpid()) return;
  g_spawning = nullptr;
  without_gil([&] { pthread_join(s->thread, nullptr); });
  delete s;
}

void start_keeper(const pap::Pool& pool) noexcept {
  const std::string no_keeper =
      "; if the program is killed, its files stay until the next "
      "start or `python -m pyarraypool clean`";
  try {
    // The interpreter this program runs, and this extension's file.
    const std::string exe = fs_path(PySys_GetObject("executable"));
    std::string so;
    if (OwnedRef core = OwnedRef::steal(
            PyImport_GetModule(OwnedRef::steal(PyUnicode_FromString("pyarraypool._core")).get()))) {
      OwnedRef file = OwnedRef::steal(PyObject_GetAttrString(core.get(), "__file__"));
      so = fs_path(file.get());
    }
    PyErr_Clear();
    if (exe.empty() || so.empty() || ::access(exe.c_str(), X_OK) != 0) {
      log_debug("pyarraypool: no keeper for pool " + pool.token() + ": sys.executable (" + exe +
                ") or pyarraypool._core.__file__ (" + so + ") is not usable" + no_keeper);
      return;
    }
    // -S: no site (no .pth files to run, nothing of site-packages imported);
    // -P: no script or current directory on sys.path (Python 3.11 and later;
    // on 3.10 kKeeperCode removes it).
    std::vector<std::string> argv = {exe, "-S"};
#if PY_VERSION_HEX >= 0x030B0000
    argv.emplace_back("-P");
#endif
    argv.insert(argv.end(), {"-c", kKeeperCode, so, pool.token(), pool.instance_id()});
    std::vector<std::string> env = keeper_environment();
    // posix_spawn returns only once the child has exec'd, which on a busy
    // machine waits for the scheduler to run it (measured: 0.15 to 10 ms).
    // A short-lived thread waits instead, so that creating the pool costs
    // the thread's start only. It touches no Python object; if the spawn
    // fails there, the pool simply has no keeper.
    auto spawning = std::make_unique<Spawning>();
    spawning->argv = std::move(argv);
    spawning->env = std::move(env);
    spawning->spawner = ::getpid();
    // All signals blocked in the thread (it inherits the mask): signals
    // for the process go to its other threads, where Python handles them.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    const int error = pthread_create(&spawning->thread, nullptr, spawn_thread, spawning.get());
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (error != 0) throw std::system_error(error, std::generic_category(), "pthread_create");
    g_spawning = spawning.release();
  } catch (const std::exception& e) {
    PyErr_Clear();
    log_debug("pyarraypool: the keeper of pool " + pool.token() + " did not start (" + e.what() +
              ")" + no_keeper);
  } catch (...) {
    PyErr_Clear();
  }
}

namespace {

// pyarraypool._keeper.run(token, instance): the keeper's life. Returns
// once the pool is removed, by the keeper or by anyone else.
PyObject* keeper_run(PyObject*, PyObject* args) {
  const char* token;
  const char* instance;
  if (!PyArg_ParseTuple(args, "ss:run", &token, &instance)) return nullptr;
  sigset_t group_signals;
  keeper_signals(&group_signals);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::signal(sig, SIG_IGN);
  // Blocked since the spawn, so that none could kill the keeper before
  // this point; ignored from now on, and any that came meanwhile dropped.
  ::sigprocmask(SIG_UNBLOCK, &group_signals, nullptr);
  if (::getsid(0) != ::getpid()) ::setsid();  // a libc without POSIX_SPAWN_SETSID
  ::prctl(PR_SET_NAME, kKeeperName, 0, 0, 0);
  try {
    const std::string t = token, i = instance;
    without_gil([&] { pap::keep_pool(t, i); });
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "the pyarraypool keeper failed");
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef keeper_methods[] = {
    {"run", keeper_run, METH_VARARGS,
     "run(token, instance): watch the pool until it is removed; remove it once abandoned."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef keeper_module = {
    PyModuleDef_HEAD_INIT,
    "pyarraypool._keeper",
    "The pool's keeper process (started by pyarraypool._core; not for import).",
    -1,
    keeper_methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace
}  // namespace pyb

PyMODINIT_FUNC PyInit__keeper(void) { return PyModule_Create(&pyb::keeper_module); }

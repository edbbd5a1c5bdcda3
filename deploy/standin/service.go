package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
)

// cmdServe runs the stand-in's HTTP service on the base port of install.ini
// until SIGTERM. bin/dss start runs it in the background.
func cmdServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	dir := fs.String("d", "", "data directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	d := dataDir(*dir)
	installed, err := d.installedVersion()
	if err != nil {
		return err
	}
	if installed != version {
		return fmt.Errorf("the data directory holds DSS %q but this is %s; run installer.sh -u first", installed, version)
	}
	port, nodeType, err := d.settings()
	if err != nil {
		return err
	}
	logger := log.New(os.Stdout, "", log.LstdFlags|log.LUTC)
	svc := &service{dir: d, nodeType: nodeType, port: port, log: logger, started: time.Now()}
	ln, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: svc.routes(), ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		<-ctx.Done()
		logger.Printf("stopping")
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	logger.Printf("DSS stand-in %s (%s node) listening on port %d, data dir %s", version, nodeType, port, d)
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	logger.Printf("stopped")
	return nil
}

type service struct {
	dir      dataDir
	nodeType string
	port     int
	log      *log.Logger
	started  time.Time
	mu       sync.Mutex        // serialises writes to the data directory
	futures  map[string]future // the jobs the API started, by id (under mu)
}

func (s *service) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.home)
	mux.HandleFunc("GET /api/health", s.health)
	mux.HandleFunc("POST /api/login", s.login)
	mux.HandleFunc("GET /api/runtime", s.admin(s.runtime))
	mux.HandleFunc("GET /public/api/projects/", s.admin(s.listProjects))
	mux.HandleFunc("POST /public/api/projects/", s.admin(s.createProject))
	mux.HandleFunc("GET /public/api/projects/{key}/", s.admin(s.getProject))
	mux.HandleFunc("GET /public/api/admin/users/{login}", s.admin(s.getUser))
	mux.HandleFunc("PUT /public/api/admin/users/{login}", s.admin(s.putUser))
	mux.HandleFunc("GET /public/api/admin/general-settings", s.admin(s.api(s.getGeneralSettings)))
	mux.HandleFunc("PUT /public/api/admin/general-settings", s.admin(s.api(s.putGeneralSettings)))
	mux.HandleFunc("GET /public/api/admin/connections/{$}", s.admin(s.api(s.listConnections)))
	mux.HandleFunc("POST /public/api/admin/connections/{$}", s.admin(s.api(s.createConnection)))
	mux.HandleFunc("GET /public/api/admin/connections/{name}", s.admin(s.api(s.getConnection)))
	mux.HandleFunc("PUT /public/api/admin/connections/{name}", s.admin(s.api(s.putConnection)))
	mux.HandleFunc("GET /public/api/plugins/{$}", s.admin(s.api(s.listPlugins)))
	mux.HandleFunc("POST /public/api/plugins/actions/installFromStore", s.admin(s.api(s.installFromStore)))
	mux.HandleFunc("GET /public/api/futures/{jobId}", s.admin(s.api(s.getFuture)))
	mux.HandleFunc("GET /public/api/admin/code-envs/{$}", s.admin(s.api(s.listCodeEnvs)))
	mux.HandleFunc("POST /public/api/admin/code-envs/from-python-preset/{preset}", s.admin(s.api(s.codeEnvFromPreset)))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusWriter{ResponseWriter: w, status: 200}
		mux.ServeHTTP(rec, r)
		s.log.Printf("%s %s %d", r.Method, r.URL.Path, rec.status)
	})
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) { w.status = code; w.ResponseWriter.WriteHeader(code) }

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func (s *service) home(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	fmt.Fprintf(w, "<!doctype html><title>DSS stand-in %s</title><h1>DSS stand-in %s</h1>"+
		"<p>This is the stand-in Fleet Manager runs where Dataiku DSS would run. It is not DSS.</p>"+
		"<p>Node type: %s. Base port: %d.</p>\n", version, version, s.nodeType, s.port)
}

func (s *service) health(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, 200, map[string]any{"status": "ok", "version": version, "nodeType": s.nodeType,
		"standin": true, "uptimeSeconds": int(time.Since(s.started).Seconds())})
}

func (s *service) login(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Login    string `json:"login"`
		Password string `json:"password"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeJSON(w, 400, map[string]string{"message": "body must be {login, password}"})
		return
	}
	users, err := s.dir.loadUsers(version)
	if err != nil {
		writeJSON(w, 500, map[string]string{"message": err.Error()})
		return
	}
	for _, u := range users {
		if u.Login == req.Login && checkPassword(u.Hash, req.Password) {
			writeJSON(w, 200, map[string]any{"login": u.Login, "admin": u.Admin})
			return
		}
	}
	writeJSON(w, 401, map[string]string{"message": "wrong login or password"})
}

// admin lets a request through with an admin API key, sent as DSS's Python
// client does: HTTP Basic with the key as user and an empty password.
func (s *service) admin(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		key, _, ok := r.BasicAuth()
		if !ok {
			if h := r.Header.Get("Authorization"); strings.HasPrefix(h, "Bearer ") {
				key, ok = strings.TrimPrefix(h, "Bearer "), true
			}
		}
		if ok && s.checkKey(key) {
			next(w, r)
			return
		}
		writeJSON(w, 401, map[string]string{"message": "an admin API key is required"})
	}
}

func (s *service) checkKey(secret string) bool {
	keys, err := s.dir.loadKeys()
	if err != nil {
		return false
	}
	for _, k := range keys {
		if k.Admin && checkPassword(k.Hash, secret) {
			return true
		}
	}
	return false
}

var reExport = regexp.MustCompile(`(?m)^\s*export\s+([A-Za-z_][A-Za-z0-9_]*)=`)

// runtime shows what this process runs with: the variables env-site.sh
// exports, the properties of config/dip.properties, the heaps and the
// Spark integration (env-spark.sh, which bin/dss sources at start).
func (s *service) runtime(w http.ResponseWriter, r *http.Request) {
	env := map[string]string{}
	if b, err := os.ReadFile(s.dir.path("bin", "env-site.sh")); err == nil {
		for _, m := range reExport.FindAllStringSubmatch(string(b), -1) {
			env[m[1]] = os.Getenv(m[1])
		}
	}
	props := map[string]string{}
	if b, err := os.ReadFile(s.dir.path("config", "dip.properties")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			line = strings.TrimSpace(line)
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			if k, v, ok := strings.Cut(line, "="); ok {
				props[strings.TrimSpace(k)] = strings.TrimSpace(v)
			}
		}
	}
	// The heaps install.ini's [javaopts] gave the processes (through
	// env-default.sh, which regenerate-config writes).
	heaps := map[string]string{}
	for _, o := range javaOpts {
		if v := strings.TrimPrefix(os.Getenv(o.env), "-Xmx"); v != "" {
			heaps[o.key] = v
		}
	}
	spark := map[string]any{"enabled": os.Getenv("DKU_SPARK_ENABLED") == "true", "home": os.Getenv("DKU_SPARK_HOME")}
	writeJSON(w, 200, map[string]any{"env": env, "properties": props, "port": s.port, "version": version, "javaOpts": heaps, "spark": spark})
}

type project struct {
	ProjectKey string    `json:"projectKey"`
	Name       string    `json:"name"`
	Owner      string    `json:"owner"`
	Created    time.Time `json:"created"`
}

var reProjectKey = regexp.MustCompile(`^[A-Z][A-Z0-9_]{0,63}$`)

func (s *service) listProjects(w http.ResponseWriter, r *http.Request) {
	entries, err := os.ReadDir(s.dir.path("projects"))
	if err != nil {
		writeJSON(w, 500, map[string]string{"message": err.Error()})
		return
	}
	out := []project{}
	for _, e := range entries {
		if p, err := s.readProject(e.Name()); err == nil {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ProjectKey < out[j].ProjectKey })
	writeJSON(w, 200, out)
}

func (s *service) readProject(key string) (project, error) {
	var p project
	b, err := os.ReadFile(s.dir.path("projects", key, "params.json"))
	if err != nil {
		return p, err
	}
	return p, json.Unmarshal(b, &p)
}

func (s *service) createProject(w http.ResponseWriter, r *http.Request) {
	var p project
	if err := json.NewDecoder(r.Body).Decode(&p); err != nil || !reProjectKey.MatchString(p.ProjectKey) {
		writeJSON(w, 400, map[string]string{"message": "body must be {projectKey (A-Z0-9_), name, owner}"})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	dir := s.dir.path("projects", p.ProjectKey)
	if err := os.Mkdir(dir, 0o755); errors.Is(err, os.ErrExist) {
		writeJSON(w, 409, map[string]string{"message": "project " + p.ProjectKey + " exists"})
		return
	} else if err != nil {
		writeJSON(w, 500, map[string]string{"message": err.Error()})
		return
	}
	p.Created = time.Now().UTC()
	b, _ := json.MarshalIndent(p, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(dir, "params.json"), b, 0o644); err != nil {
		writeJSON(w, 500, map[string]string{"message": err.Error()})
		return
	}
	writeJSON(w, 200, map[string]string{"projectKey": p.ProjectKey})
}

func (s *service) getProject(w http.ResponseWriter, r *http.Request) {
	p, err := s.readProject(r.PathValue("key"))
	if err != nil {
		writeJSON(w, 404, map[string]string{"message": "no project " + r.PathValue("key")})
		return
	}
	writeJSON(w, 200, p)
}

// userDefinition is a user as DSS's admin API shows it; a PUT may carry a
// new password, which is never shown.
type userDefinition struct {
	Login       string   `json:"login"`
	DisplayName string   `json:"displayName"`
	SourceType  string   `json:"sourceType"`
	Groups      []string `json:"groups"`
	Password    string   `json:"password,omitempty"`
}

func definitionOf(u user) userDefinition {
	d := userDefinition{Login: u.Login, DisplayName: u.Login, SourceType: "LOCAL", Groups: []string{}}
	if u.Admin {
		d.Groups = []string{"administrators"}
	}
	return d
}

func (s *service) getUser(w http.ResponseWriter, r *http.Request) {
	users, err := s.dir.loadUsers(version)
	if err != nil {
		writeJSON(w, 500, map[string]string{"message": err.Error()})
		return
	}
	for _, u := range users {
		if u.Login == r.PathValue("login") {
			writeJSON(w, 200, definitionOf(u))
			return
		}
	}
	writeJSON(w, 404, map[string]string{"message": "user " + r.PathValue("login") + " not found"})
}

// putUser saves a user's definition, as DSS's admin API does; of it the
// stand-in keeps the password.
func (s *service) putUser(w http.ResponseWriter, r *http.Request) {
	var def userDefinition
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&def); err != nil || def.Login != r.PathValue("login") {
		writeJSON(w, 400, map[string]string{"message": "body must be the user's definition, with its login"})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	users, err := s.dir.loadUsers(version)
	if err != nil {
		writeJSON(w, 500, map[string]string{"message": err.Error()})
		return
	}
	for i, u := range users {
		if u.Login != def.Login {
			continue
		}
		if def.Password != "" {
			h, err := hashPassword(def.Password)
			if err != nil {
				writeJSON(w, 500, map[string]string{"message": err.Error()})
				return
			}
			users[i].Hash = h
			if err := s.dir.saveUsers(version, users); err != nil {
				writeJSON(w, 500, map[string]string{"message": err.Error()})
				return
			}
		}
		writeJSON(w, 200, definitionOf(users[i]))
		return
	}
	writeJSON(w, 404, map[string]string{"message": "user " + def.Login + " not found"})
}

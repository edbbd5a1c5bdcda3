// Package crashpoint names the places where a role can die in the middle of
// its work: before and after each side effect of every step (a machine
// made, a file renamed, a record written, a message acknowledged). A role
// takes a Hook in its configuration and passes each point by name; in
// production the hook is nil and a point costs a nil check.
//
// Tests use the points to kill a role exactly there (Crasher) and to list
// the points an operation passes (Recorder), which is how the crash-point
// harness proves that every step of every operation survives a crash and a
// redelivery (docs/lifecycle.md has its table).
//
// Only this module's packages may import it (it is internal): the roles
// (server, provisioner and its backends, agent) and their tests.
package crashpoint

import "sync"

// Hook is called with the name of every crash point a role passes. Names
// are "<role>/<operation>/<step>:before|after" or "<role>/<operation>/<what
// is done by then>"; the same name may be passed more than once in one
// operation (a call made for each of several volumes).
type Hook func(point string)

// At passes the crash point named point.
func (h Hook) At(point string) {
	if h != nil {
		h(point)
	}
}

// Around passes point+":before", does fn, and passes point+":after" if fn
// succeeded: a crash at ":after" is a crash once the side effect is done
// but before anything else has learnt of it.
func (h Hook) Around(point string, fn func() error) error {
	h.At(point + ":before")
	if err := fn(); err != nil {
		return err
	}
	h.At(point + ":after")
	return nil
}

// Recorder records the points passed, in order. Its Hook may be called from
// several goroutines.
type Recorder struct {
	mu     sync.Mutex
	points []string
}

// Hook returns the hook that records into r.
func (r *Recorder) Hook() Hook {
	return func(point string) {
		r.mu.Lock()
		r.points = append(r.points, point)
		r.mu.Unlock()
	}
}

// Points returns the points passed so far, in order.
func (r *Recorder) Points() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.points...)
}

// Crasher kills a role at the n-th point it passes (counting from 1): it
// calls Die, which must cut the role off from the world as the death of its
// process would (close its bus connection, stop its other goroutines), then
// parks the goroutine that passed the point for ever, so that none of its
// deferred clean-up runs. Other goroutines of the dead role that pass a
// point after the crash are parked too.
type Crasher struct {
	N   int
	Die func()
	// At, when set, counts only the passes of that point: the role dies
	// at its N-th pass, whatever other points were passed before it (the
	// order of points passed by goroutines of their own may differ from
	// run to run).
	At string

	mu      sync.Mutex
	count   int
	point   string
	passed  []string // the points passed, up to the crash
	crashed chan struct{}
	once    sync.Once
}

// Hook returns the hook that crashes at the N-th point.
func (c *Crasher) Hook() Hook {
	c.once.Do(func() { c.crashed = make(chan struct{}) })
	return func(point string) {
		c.mu.Lock()
		if c.point != "" {
			// Another goroutine of the dead role: it must not go on
			// either.
			c.mu.Unlock()
			select {}
		}
		if c.At == "" || point == c.At {
			c.count++
		}
		c.passed = append(c.passed, point)
		if c.count != c.N || c.At != "" && point != c.At {
			dead := c.count > c.N
			c.mu.Unlock()
			if dead {
				// Another goroutine of the dead role: it must not go on
				// either.
				select {}
			}
			return
		}
		c.point = point
		c.mu.Unlock()
		if c.Die != nil {
			c.Die()
		}
		close(c.crashed)
		select {} // the process is dead: nothing after this point runs
	}
}

// Crashed is closed once the role has crashed.
func (c *Crasher) Crashed() <-chan struct{} {
	c.once.Do(func() { c.crashed = make(chan struct{}) })
	return c.crashed
}

// Passed returns the points passed up to the crash, in order: the path
// the role took, to compare with a recorded one.
func (c *Crasher) Passed() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.passed...)
}

// Point is the point the role crashed at ("" before it did).
func (c *Crasher) Point() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.point
}

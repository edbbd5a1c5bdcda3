package server

import "testing"

// TestDiagBudget: an operation's diagnosis chunks are counted, in bytes,
// up to diagBytesPerOperation; counts of operations no longer running go
// once there are many.
func TestDiagBudget(t *testing.T) {
	var b diagBudget
	running := map[string]bool{"op-a": true}
	isRunning := func(job string) bool { return running[job] }
	const chunk = 256 << 10
	for i := range diagBytesPerOperation / chunk {
		if !b.take("op-a", chunk, isRunning) {
			t.Fatalf("chunk %d refused", i+1)
		}
	}
	if b.take("op-a", 1, isRunning) {
		t.Fatal("a byte over the budget was taken")
	}
	for i := range 100 {
		if !b.take("op-"+string(rune('A'+i%26))+string(rune('0'+i/26)), chunk, isRunning) {
			t.Fatalf("another operation's first chunk was refused")
		}
	}
	if len(b.used) > 64 {
		t.Fatalf("%d operations counted, want at most 64 (those ended go)", len(b.used))
	}
	if b.take("op-a", chunk, isRunning) {
		t.Fatal("the running operation's count went with the others'")
	}
}

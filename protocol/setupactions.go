package protocol

// SetupActionType is the type of a template's setup action. The values are
// Dataiku's FMSetupActionType names and are exact on the wire.
type SetupActionType string

// The setup action types Dataiku's client knows (dataikuapi 14.3.3).
const (
	ActionRunAnsibleTasks            SetupActionType = "RUN_ANSIBLE_TASKS"
	ActionInstallSystemPackages      SetupActionType = "INSTALL_SYSTEM_PACKAGES"
	ActionInstallDSSPluginsFromStore SetupActionType = "INSTALL_DSS_PLUGINS_FROM_STORE"
	ActionSetupK8sAndSpark           SetupActionType = "SETUP_K8S_AND_SPARK"
	ActionSetupRuntimeDatabase       SetupActionType = "SETUP_RUNTIME_DATABASE"
	ActionSetupMUSAutocreate         SetupActionType = "SETUP_MUS_AUTOCREATE"
	ActionSetupUICustomization       SetupActionType = "SETUP_UI_CUSTOMIZATION"
	ActionSetupMemorySettings        SetupActionType = "SETUP_MEMORY_SETTINGS"
	ActionSetupGraphicsExport        SetupActionType = "SETUP_GRAPHICS_EXPORT"
	ActionAddAuthorizedKey           SetupActionType = "ADD_AUTHORIZED_KEY"
	ActionInstallJDBCDriver          SetupActionType = "INSTALL_JDBC_DRIVER"
	ActionSetupAdvancedSecurity      SetupActionType = "SETUP_ADVANCED_SECURITY"
	ActionSetupInstanceName          SetupActionType = "SETUP_INSTANCE_NAME"
	ActionSetupNoneK8sAndSpark       SetupActionType = "SETUP_NONE_K8S_AND_SPARK"
	ActionSetupSecureCookies         SetupActionType = "SETUP_SECURE_COOKIES"
	ActionAddEnvVariables            SetupActionType = "ADD_ENV_VARIABLES"
	ActionAddProperties              SetupActionType = "ADD_PROPERTIES"
	ActionAddSSHKey                  SetupActionType = "ADD_SSH_KEY"
	ActionAddCAToTruststore          SetupActionType = "ADD_CA_TO_TRUSTSTORE"
	ActionSetupProxy                 SetupActionType = "SETUP_PROXY"
	ActionInstallCodeEnvWithPreset   SetupActionType = "INSTALL_CODE_ENV_WITH_PRESET"
	ActionUpdateDSSPort              SetupActionType = "UPDATE_DSS_PORT"
	ActionInstallDeprecatedPython    SetupActionType = "INSTALL_DEPRECATED_PYTHON"
)

// SetupActionTypes lists every known type, in the client's order.
var SetupActionTypes = []SetupActionType{
	ActionRunAnsibleTasks, ActionInstallSystemPackages, ActionInstallDSSPluginsFromStore,
	ActionSetupK8sAndSpark, ActionSetupRuntimeDatabase, ActionSetupMUSAutocreate,
	ActionSetupUICustomization, ActionSetupMemorySettings, ActionSetupGraphicsExport,
	ActionAddAuthorizedKey, ActionInstallJDBCDriver, ActionSetupAdvancedSecurity,
	ActionSetupInstanceName, ActionSetupNoneK8sAndSpark, ActionSetupSecureCookies,
	ActionAddEnvVariables, ActionAddProperties, ActionAddSSHKey, ActionAddCAToTruststore,
	ActionSetupProxy, ActionInstallCodeEnvWithPreset, ActionUpdateDSSPort,
	ActionInstallDeprecatedPython,
}

// Known reports whether t is one of SetupActionTypes.
func (t SetupActionType) Known() bool {
	for _, k := range SetupActionTypes {
		if k == t {
			return true
		}
	}
	return false
}

// Stage is when during the startup sequence a staged setup action runs. The
// values are Dataiku's FMSetupActionStage names.
type Stage string

// The stages, in the order the startup sequence reaches them.
const (
	StageBeforeInstall   Stage = "before_install"
	StageAfterInstall    Stage = "after_install"
	StageAfterDSSStartup Stage = "after_dss_startup"
)

// Stages lists the stages in the order they run.
var Stages = []Stage{StageBeforeInstall, StageAfterInstall, StageAfterDSSStartup}

// StagesFor are the stages an action of type t may be given, the first
// the one it runs at without a stage parameter. Actions that go through
// DSS's admin API need DSS running; the heaps are taken when DSS starts.
func StagesFor(t SetupActionType) []Stage {
	switch t {
	case ActionSetupInstanceName, ActionSetupSecureCookies, ActionSetupUICustomization,
		ActionSetupRuntimeDatabase, ActionSetupMUSAutocreate, ActionInstallDSSPluginsFromStore,
		ActionInstallCodeEnvWithPreset, ActionSetupK8sAndSpark:
		return []Stage{StageAfterDSSStartup}
	case ActionSetupMemorySettings:
		return []Stage{StageAfterInstall}
	case ActionSetupGraphicsExport, ActionSetupNoneK8sAndSpark:
		// dssadmin commands: DSS must be installed.
		return []Stage{StageAfterInstall, StageAfterDSSStartup}
	}
	return []Stage{StageAfterInstall, StageBeforeInstall, StageAfterDSSStartup}
}

// Known reports whether s is one of Stages.
func (s Stage) Known() bool {
	return s == StageBeforeInstall || s == StageAfterInstall || s == StageAfterDSSStartup
}
